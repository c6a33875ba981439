//! Device SDK behaviours (crates/furrow-client) against the real gateway and
//! against small fake gateways written here with furrow-proto, where the
//! test must control exactly what the gateway says: pipelining within
//! `max_inflight`, REJECT handling, local payload validation, commands and
//! their repeats, the gateway clock, keepalive, and `send` waiting on a full
//! outbox.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use furrow_client::{
    handler, Backoff, Client, ClientError, Command, CommandReply, Config, Disconnect,
    Event as ClientEvent,
};
use furrow_proto::content::ContentError;
use furrow_proto::{CommandStatus, Message, Str, Welcome};
use support::{within, RawDevice, TestGateway};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A client configuration with a short backoff.
fn cfg(addr: impl ToString, id: &str, token: &str) -> Config {
    let mut c = Config::new(addr.to_string(), id, token);
    c.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
    };
    c.connect_timeout = Duration::from_secs(5);
    c
}

/// Waits for an event matching `pred`; returns it and everything before.
async fn wait_event(
    rx: &mut broadcast::Receiver<ClientEvent>,
    wait: Duration,
    what: &str,
    pred: impl Fn(&ClientEvent) -> bool,
) -> (ClientEvent, Vec<ClientEvent>) {
    let deadline = Instant::now() + wait;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = match tokio::time::timeout(left, rx.recv()).await {
            Err(_) => panic!("no {what} within {wait:?}; events seen: {before:?}"),
            Ok(Ok(e)) => e,
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                panic!("client events closed while waiting for {what}; seen: {before:?}")
            }
        };
        if pred(&e) {
            return (e, before);
        }
        before.push(e);
    }
}

/// A fake gateway: a listener the test accepts on by hand.
struct Fake {
    listener: TcpListener,
}

impl Fake {
    async fn bind() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Accepts the client's next connection and reads its HELLO.
    async fn accept(&self) -> FakeConn {
        let (s, _) = within(WAIT, "the client connects", self.listener.accept())
            .await
            .unwrap();
        let mut c = FakeConn {
            dev: RawDevice::from_stream(s),
        };
        match c.recv().await {
            Some(Message::Hello(h)) => {
                assert_eq!(h.version, 1);
            }
            other => panic!("expected HELLO first, got {other:?}"),
        }
        c
    }
}

/// One connection of the fake gateway (RawDevice's framing, other role).
struct FakeConn {
    dev: RawDevice,
}

fn welcome(keepalive_s: u16, max_inflight: u16, last_seq: u64, server_time_ms: u64) -> Message {
    Message::Welcome(Welcome {
        version: 1,
        keepalive_s,
        max_frame: furrow_proto::DEFAULT_MAX_FRAME,
        max_inflight,
        last_seq,
        server_time_ms,
        capabilities: None,
    })
}

impl FakeConn {
    async fn send(&mut self, m: &Message) {
        self.dev.send(m).await
    }

    async fn welcome(&mut self, max_inflight: u16, last_seq: u64) {
        self.send(&welcome(30, max_inflight, last_seq, support::now_ms()))
            .await
    }

    /// The next message from the client; `None` when it closed. Fails on
    /// timeout.
    async fn recv(&mut self) -> Option<Message> {
        self.recv_within(WAIT).await
    }

    async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        match self.dev.next_event(wait).await {
            support::Event::Msg(m) => Some(m),
            support::Event::Eof | support::Event::Reset(_) => None,
            support::Event::Timeout => panic!("nothing from the client within {wait:?}"),
        }
    }

    /// The next message, or `None` after `wait` of silence (panics on close).
    async fn try_recv(&mut self, wait: Duration) -> Option<Message> {
        match self.dev.next_event(wait).await {
            support::Event::Msg(m) => Some(m),
            support::Event::Timeout => None,
            other => panic!("the client closed the connection: {other:?}"),
        }
    }

    /// Seqs of the TELEMETRY that arrive until `quiet` passes without any
    /// (PINGs are answered and skipped).
    async fn telemetry_until_quiet(&mut self, quiet: Duration) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(m) = self.try_recv(quiet).await {
            match m {
                Message::Telemetry(t) => seqs.push(t.seq),
                Message::Ping { nonce } => self.send(&Message::Pong { nonce }).await,
                other => panic!("expected TELEMETRY, got {other:?}"),
            }
        }
        seqs
    }
}

/// Closes the client while the fake gateway holds its connection: the
/// client says GOODBYE NORMAL, and the fake then closes (as the gateway
/// does after storing what it read).
async fn close_fake(client: &Client, mut conn: FakeConn) {
    let bye = async move {
        loop {
            match conn.recv().await {
                Some(Message::Goodbye(g)) => {
                    assert_eq!(g.code, 0, "GOODBYE NORMAL on close");
                    return;
                }
                Some(_) => {}
                None => panic!("the client closed without GOODBYE"),
            }
        }
    };
    within(WAIT, "client close", async {
        tokio::join!(client.close(), bye);
    })
    .await;
}

fn json(i: u64) -> Bytes {
    Bytes::from(format!("{{\"i\":{i}}}"))
}

// ---------------------------------------------------------------------------
// Pipelining and max_inflight
// ---------------------------------------------------------------------------

/// With WELCOME max_inflight 4 the client has exactly min(4, queued)
/// readings outstanding at every moment: it pipelines (does not wait for
/// each ACK) and never exceeds the window, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_fills_but_never_exceeds_max_inflight() {
    const N: u64 = 30;
    let fake = Fake::bind().await;
    let client = Client::start(cfg(fake.addr(), "pipe-1", "t")).unwrap();
    for i in 1..=N {
        assert_eq!(client.send(1, json(i)).await.unwrap(), i);
    }
    let mut conn = fake.accept().await;
    conn.welcome(4, 0).await;
    let mut next_expected = 1;
    let mut acked = 0;
    let mut step = 0;
    while acked < N {
        let got = conn.telemetry_until_quiet(Duration::from_millis(200)).await;
        for s in &got {
            assert_eq!(*s, next_expected, "TELEMETRY out of order");
            next_expected += 1;
        }
        let outstanding = next_expected - 1 - acked;
        assert!(
            outstanding <= 4,
            "{outstanding} unacknowledged TELEMETRY with max_inflight 4 (acked {acked})"
        );
        assert_eq!(
            outstanding,
            4.min(N - acked),
            "the client should fill the window without waiting (acked {acked})"
        );
        // ACK one or two at a time (cumulative).
        step += 1;
        acked = (acked + 1 + step % 2).min(next_expected - 1);
        conn.send(&Message::Ack { seq: acked }).await;
    }
    within(WAIT, "flush", client.flush()).await.unwrap();
    assert_eq!(client.pending(), 0);
    close_fake(&client, conn).await;
}

/// Against the real gateway with limits.max_inflight = 4, many readings go
/// through the small window; ACK events never go backwards; all stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_window_against_the_gateway_delivers_everything_once() {
    const N: u64 = 1_000;
    let gw = TestGateway::start_with(|c| c.limits.max_inflight = 4).await;
    let token = gw.add_device("pipe-2").await;
    let client = Client::start(cfg(gw.addr(), "pipe-2", &token)).unwrap();
    let mut events = client.events();
    let (e, _) = wait_event(&mut events, WAIT, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    assert_eq!(e, ClientEvent::Connected { last_seq: 0 });
    let watcher = tokio::spawn(async move {
        let mut last = 0;
        let mut acks = 0;
        loop {
            match events.recv().await {
                Ok(ClientEvent::Acked(n)) => {
                    assert!(n > last, "Acked went backwards: {last} then {n}");
                    last = n;
                    acks += 1;
                    if n == N {
                        return acks;
                    }
                }
                Ok(ClientEvent::Disconnected { reason, .. }) => {
                    panic!("unexpected disconnect: {reason:?}")
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return acks,
            }
        }
    });
    for i in 1..=N {
        client.send(1, json(i)).await.unwrap();
    }
    within(Duration::from_secs(30), "flush", client.flush())
        .await
        .unwrap();
    assert_eq!(*client.acked().borrow(), N);
    let acks = within(WAIT, "watcher", watcher).await.unwrap();
    assert!(acks > 0);
    support::assert_seqs(
        &support::stored_seqs_async(&gw.db_path(), "pipe-2").await,
        1..=N,
        "stored",
    );
    client.close().await;
}

// ---------------------------------------------------------------------------
// Local validation and REJECT
// ---------------------------------------------------------------------------

/// `send` refuses what the gateway would REJECT, and queues nothing.
#[tokio::test]
async fn invalid_payloads_are_refused_before_sending() {
    // Nobody listens there: nothing is ever delivered in this test.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::start(cfg(format!("127.0.0.1:{port}"), "val-1", "t")).unwrap();
    let bad: Vec<(u8, Vec<u8>)> = vec![
        (1, b"{\"t\":".to_vec()),    // truncated JSON
        (1, b"{} {}".to_vec()),      // two JSON values
        (1, b"NaN".to_vec()),        // not JSON
        (2, vec![0x18]),             // truncated CBOR
        (2, vec![0x01, 0x02]),       // two CBOR items
        (3, vec![0xff, 0xfe, 0x41]), // not UTF-8
    ];
    for (ct, p) in bad {
        match client.send(ct, p.clone()).await {
            Err(ClientError::InvalidPayload(ContentError::InvalidPayload(_))) => {}
            other => {
                panic!("content type {ct}, payload {p:?}: expected InvalidPayload, got {other:?}")
            }
        }
    }
    for ct in [4u8, 9, 255] {
        match client.send(ct, &b"x"[..]).await {
            Err(ClientError::InvalidPayload(ContentError::UnsupportedContentType(c))) => {
                assert_eq!(c, ct)
            }
            other => panic!("content type {ct}: expected UnsupportedContentType, got {other:?}"),
        }
    }
    // Larger than WELCOME's (default) max_frame allows.
    match client.send(0, vec![0u8; 70_000]).await {
        Err(ClientError::TooLarge { len, max }) => {
            assert_eq!(len, 70_000);
            assert!(max < 65_536, "max {max}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(client.pending(), 0, "nothing refused is queued");
    assert_eq!(client.last_seq(), 0, "no seq consumed by a refused reading");
    // Octets accept anything, and valid readings get seqs from 1.
    assert_eq!(client.send(0, vec![0xff, 0x00]).await.unwrap(), 1);
    assert_eq!(client.send(1, &b"[1,2]"[..]).await.unwrap(), 2);
    assert_eq!(client.pending(), 2);
    client.close().await;
}

/// A REJECTed reading is reported, dropped from the outbox (flush does not
/// wait for it) and never sent again, also not after a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_reading_is_reported_dropped_and_not_resent() {
    let fake = Fake::bind().await;
    let client = Client::start(cfg(fake.addr(), "rej-1", "t")).unwrap();
    let mut events = client.events();
    for i in 1..=3 {
        client.send(1, json(i)).await.unwrap();
    }
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(got, vec![1, 2, 3]);
    conn.send(&Message::Reject(furrow_proto::Reject {
        seq: 2,
        code: 20,
        reason: Str::from("payload is not valid json"),
    }))
    .await;
    let (e, _) = wait_event(&mut events, WAIT, "Rejected", |e| {
        matches!(e, ClientEvent::Rejected { .. })
    })
    .await;
    assert_eq!(
        e,
        ClientEvent::Rejected {
            seq: 2,
            code: 20,
            reason: "payload is not valid json".into()
        }
    );
    within(WAIT, "pending drops to 2", async {
        while client.pending() != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // The connection breaks before any ACK; the gateway stored nothing.
    drop(conn);
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        got,
        vec![1, 3],
        "resent after reconnect, without the rejected 2"
    );
    conn.send(&Message::Ack { seq: 3 }).await;
    within(WAIT, "flush", client.flush()).await.unwrap();
    assert_eq!(client.pending(), 0);
    assert_eq!(*client.acked().borrow(), 3);
    close_fake(&client, conn).await;
}

/// WELCOME's last_seq drops what the gateway already has; the rest is
/// resent in order, starting right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resends_after_welcome_last_seq_in_order() {
    let fake = Fake::bind().await;
    let client = Client::start(cfg(fake.addr(), "resend-1", "t")).unwrap();
    for i in 1..=10 {
        client.send(1, json(i)).await.unwrap();
    }
    let mut conn = fake.accept().await;
    conn.welcome(256, 0).await;
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    conn.send(&Message::Ack { seq: 3 }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    // The gateway had stored up to 6 without ACKing it on the old connection.
    let mut conn = fake.accept().await;
    conn.welcome(256, 6).await;
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(got, vec![7, 8, 9, 10]);
    assert_eq!(client.pending(), 4);
    conn.send(&Message::Ack { seq: 10 }).await;
    within(WAIT, "flush", client.flush()).await.unwrap();
    close_fake(&client, conn).await;
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn command(id: u64, name: &str) -> Message {
    Message::Command(furrow_proto::Command {
        command_id: id,
        name: Str::from(name),
        content_type: 1,
        payload: Bytes::from_static(b"{\"delay\":1}"),
    })
}

/// Reads until a COMMAND_RESULT (answering PINGs on the way).
async fn command_result(conn: &mut FakeConn) -> furrow_proto::CommandResult {
    loop {
        match conn.recv().await {
            Some(Message::CommandResult(r)) => return r,
            Some(Message::Ping { nonce }) => conn.send(&Message::Pong { nonce }).await,
            other => panic!("expected COMMAND_RESULT, got {other:?}"),
        }
    }
}

/// A handler receives the COMMAND and the SDK answers COMMAND_RESULT; the
/// same command id again gets the same answer without running the handler
/// a second time (also on a new connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_command_gets_the_same_answer_and_runs_once() {
    let runs = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Command>::new()));
    let h = {
        let runs = Arc::clone(&runs);
        let seen = Arc::clone(&seen);
        handler(move |c: Command| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            seen.lock().unwrap().push(c.clone());
            async move {
                // The answer names the run: a second run would differ.
                CommandReply::ok(1, format!("{{\"run\":{n},\"name\":\"{}\"}}", c.name))
            }
        })
    };
    let fake = Fake::bind().await;
    let client = Client::start_with_handler(cfg(fake.addr(), "cmd-1", "t"), h).unwrap();
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;

    conn.send(&command(7, "reboot")).await;
    let first = command_result(&mut conn).await;
    assert_eq!(first.command_id, 7);
    assert_eq!(first.status, CommandStatus::Succeeded);
    assert_eq!(first.content_type, 1);
    assert_eq!(&first.payload[..], b"{\"run\":1,\"name\":\"reboot\"}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].id, 7);
        assert_eq!(seen[0].name, "reboot");
        assert_eq!(seen[0].content_type, 1);
        assert_eq!(&seen[0].payload[..], b"{\"delay\":1}");
    }

    // Redelivered (at least once): same answer, handler not run again.
    conn.send(&command(7, "reboot")).await;
    let second = command_result(&mut conn).await;
    assert_eq!(second, first, "a repeated command id gets the same result");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");

    // Also after a reconnect.
    drop(conn);
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;
    conn.send(&command(7, "reboot")).await;
    let third = command_result(&mut conn).await;
    assert_eq!(third, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A new id runs the handler.
    conn.send(&command(8, "blink")).await;
    let r = command_result(&mut conn).await;
    assert_eq!(r.command_id, 8);
    assert_eq!(&r.payload[..], b"{\"run\":2,\"name\":\"blink\"}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    close_fake(&client, conn).await;
}

/// The same COMMAND delivered twice back to back while the handler is still
/// running: the handler runs once, and the answer that follows is the one
/// every later repeat gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_repeated_while_running_runs_once() {
    let runs = Arc::new(AtomicU32::new(0));
    let h = {
        let runs = Arc::clone(&runs);
        handler(move |_c: Command| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                CommandReply::ok(3, format!("run {n}"))
            }
        })
    };
    let fake = Fake::bind().await;
    let client = Client::start_with_handler(cfg(fake.addr(), "cmd-2", "t"), h).unwrap();
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;
    conn.send(&command(7, "slow")).await;
    conn.send(&command(7, "slow")).await;
    let first = command_result(&mut conn).await;
    assert_eq!(first.command_id, 7);
    assert_eq!(&first.payload[..], b"run 1");
    // At most one more result for the duplicate, and it is identical.
    match conn.try_recv(Duration::from_millis(500)).await {
        None => {}
        Some(Message::CommandResult(r)) => assert_eq!(r, first),
        Some(other) => panic!("unexpected {other:?}"),
    }
    conn.send(&command(7, "slow")).await;
    assert_eq!(command_result(&mut conn).await, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    close_fake(&client, conn).await;
}

/// Without a handler, every command is answered "unknown command".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_handler_commands_are_unknown() {
    let fake = Fake::bind().await;
    let client = Client::start(cfg(fake.addr(), "cmd-3", "t")).unwrap();
    let mut conn = fake.accept().await;
    conn.welcome(16, 0).await;
    conn.send(&command(11, "anything")).await;
    let r = command_result(&mut conn).await;
    assert_eq!(r.command_id, 11);
    assert_eq!(r.status, CommandStatus::UnknownCommand);
    close_fake(&client, conn).await;
}

// ---------------------------------------------------------------------------
// Gateway clock
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_time_comes_from_welcome() {
    const OFFSET_MS: u64 = 3_600_000; // the gateway's clock is an hour ahead
    let fake = Fake::bind().await;
    let client = Client::start(cfg(fake.addr(), "clock-1", "t")).unwrap();
    let mut events = client.events();
    let mut conn = fake.accept().await;
    assert_eq!(client.server_time_ms(), None, "unknown before WELCOME");
    conn.send(&welcome(30, 16, 0, support::now_ms() + OFFSET_MS))
        .await;
    wait_event(&mut events, WAIT, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    let t = client.server_time_ms().expect("known after WELCOME");
    let want = support::now_ms() + OFFSET_MS;
    assert!(
        t.abs_diff(want) < 1_000,
        "server_time_ms {t}, expected about {want} (diff {} ms)",
        t as i64 - want as i64
    );
    // It keeps running with the local clock.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t2 = client.server_time_ms().unwrap();
    assert!(t2 >= t + 250 && t2 <= t + 1_000, "{t} then {t2}");
    close_fake(&client, conn).await;
}

// ---------------------------------------------------------------------------
// Keepalive
// ---------------------------------------------------------------------------

/// A gateway that goes silent after WELCOME (keepalive 1 s) and never
/// answers PINGs: the client pings, then gives up after 1.5 x keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_gateway_is_detected_by_keepalive() {
    let fake = Fake::bind().await;
    let mut c = cfg(fake.addr(), "ka-1", "t");
    c.keepalive_s = 1;
    // Keep the reconnect away from the measurement.
    c.backoff = Backoff {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(5),
        multiplier: 1.0,
    };
    let client = Client::start(c).unwrap();
    let mut events = client.events();
    let mut conn = fake.accept().await;
    conn.send(&welcome(1, 16, 0, support::now_ms())).await;
    wait_event(&mut events, WAIT, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    let connected = Instant::now();
    // Read (and ignore) what the client sends, counting PINGs.
    let pings = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            match conn.dev.next_event(Duration::from_secs(5)).await {
                support::Event::Msg(Message::Ping { .. }) => pings += 1,
                support::Event::Msg(other) => panic!("unexpected {other:?}"),
                _ => return pings,
            }
        }
    });
    let (e, before) = wait_event(&mut events, Duration::from_secs(5), "Disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    let took = connected.elapsed();
    match e {
        ClientEvent::Disconnected {
            reason: Disconnect::KeepaliveTimeout,
            ..
        } => {}
        other => panic!("expected KeepaliveTimeout, got {other:?} (before: {before:?})"),
    }
    assert!(
        took >= Duration::from_millis(1_400) && took <= Duration::from_secs(3),
        "keepalive timeout after {took:?}, expected about 1.5 s"
    );
    let pings = within(WAIT, "fake reader ends", pings).await.unwrap();
    assert!(pings >= 1, "the client pinged before giving up");
    client.close().await;
}

/// A gateway that answers PINGs keeps an otherwise idle session alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_pings_keep_an_idle_session_alive() {
    let fake = Fake::bind().await;
    let mut c = cfg(fake.addr(), "ka-2", "t");
    c.keepalive_s = 1;
    let client = Client::start(c).unwrap();
    let mut events = client.events();
    let mut conn = fake.accept().await;
    conn.send(&welcome(1, 16, 0, support::now_ms())).await;
    wait_event(&mut events, WAIT, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(4) {
        match conn.try_recv(Duration::from_millis(200)).await {
            Some(Message::Ping { nonce }) => {
                pings += 1;
                conn.send(&Message::Pong { nonce }).await;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    assert!(
        pings >= 2,
        "expected a PING about every second, got {pings}"
    );
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, ClientEvent::Disconnected { .. }),
            "the session dropped: {e:?}"
        );
    }
    close_fake(&client, conn).await;
}

// ---------------------------------------------------------------------------
// A full outbox
// ---------------------------------------------------------------------------

/// outbox_capacity 10, gateway unreachable: ten sends complete, the
/// eleventh waits; once a gateway appears and ACKs, it completes and
/// everything is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_on_a_full_outbox_until_the_gateway_acks() {
    // Provision first, in the data directory the gateway will use.
    let data = tempfile::tempdir().unwrap();
    let token = {
        let store = furrow::server::open_store(&furrow::Config {
            data_dir: data.path().to_path_buf(),
            ..furrow::Config::default()
        })
        .unwrap();
        furrow::devices::add_device(&store, "full-1").await.unwrap()
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = cfg(addr, "full-1", &token);
    c.outbox_capacity = 10;
    let client = Arc::new(Client::start(c).unwrap());
    for i in 1..=10 {
        let seq = within(
            Duration::from_secs(1),
            "send into a non-full outbox",
            client.send(1, json(i)),
        )
        .await
        .unwrap();
        assert_eq!(seq, i);
    }
    let eleventh = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.send(1, json(11)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !eleventh.is_finished(),
        "the 11th send completed with a full outbox and no gateway: {:?}",
        eleventh.await
    );
    assert_eq!(client.pending(), 10);

    let d = data.path().to_path_buf();
    let gw = TestGateway::start_with(|cfg| {
        cfg.listen = addr;
        cfg.data_dir = d;
    })
    .await;
    let seq = within(WAIT, "the 11th send after ACKs", eleventh)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seq, 11);
    for i in 12..=40 {
        within(WAIT, "send", client.send(1, json(i))).await.unwrap();
    }
    within(WAIT, "flush", client.flush()).await.unwrap();
    support::assert_seqs(
        &support::stored_seqs_async(&gw.db_path(), "full-1").await,
        1..=40,
        "stored",
    );
    client.close().await;
}

/// The same, step by step against a fake gateway: space opens exactly as
/// ACKs free it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proceeds_exactly_as_acks_free_space() {
    let fake = Fake::bind().await;
    let mut c = cfg(fake.addr(), "full-2", "t");
    c.outbox_capacity = 10;
    let client = Arc::new(Client::start(c).unwrap());
    for i in 1..=10 {
        client.send(1, json(i)).await.unwrap();
    }
    let spawn_send = |i: u64| {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.send(1, json(i)).await })
    };
    let s11 = spawn_send(11);
    let mut conn = fake.accept().await;
    conn.welcome(256, 0).await;
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    assert!(!s11.is_finished(), "sent into a full outbox before any ACK");
    conn.send(&Message::Ack { seq: 2 }).await;
    assert_eq!(within(WAIT, "11th send", s11).await.unwrap().unwrap(), 11);
    let s12 = spawn_send(12);
    assert_eq!(within(WAIT, "12th send", s12).await.unwrap().unwrap(), 12);
    let s13 = spawn_send(13);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!s13.is_finished(), "the outbox holds 10 again (3..=12)");
    assert_eq!(client.pending(), 10);
    conn.send(&Message::Ack { seq: 12 }).await;
    assert_eq!(within(WAIT, "13th send", s13).await.unwrap().unwrap(), 13);
    let got = conn.telemetry_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(got, vec![11, 12, 13]);
    conn.send(&Message::Ack { seq: 13 }).await;
    within(WAIT, "flush", client.flush()).await.unwrap();
    close_fake(&client, conn).await;
}

// ---------------------------------------------------------------------------
// Closing
// ---------------------------------------------------------------------------

/// After `close()`, the API does not hang: `send` says Closed, and a
/// `flush` (waiting when close is called, or called afterwards) returns
/// (Closed) although readings stay unacknowledged in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_waiting_flushes_and_later_calls() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Arc::new(Client::start(cfg(format!("127.0.0.1:{port}"), "close-1", "t")).unwrap());
    client.send(1, json(1)).await.unwrap();
    let waiting = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "nothing is acknowledged yet");
    within(Duration::from_secs(5), "close", client.close()).await;
    assert!(
        matches!(client.send(1, json(2)).await, Err(ClientError::Closed)),
        "send after close"
    );
    assert_eq!(client.pending(), 1, "the unacknowledged reading stays");
    let later = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    let waiting = tokio::time::timeout(Duration::from_secs(2), waiting).await;
    assert!(
        matches!(later, Ok(Err(ClientError::Closed))),
        "flush() called after close() with a reading pending: {:?} (Err(Elapsed) = still \
         waiting after 2 s)",
        later.map(|r| r.map_err(|e| e.to_string()))
    );
    assert!(
        matches!(waiting, Ok(Ok(Err(ClientError::Closed)))),
        "flush() waiting when close() was called: {:?} (Err(Elapsed) = still waiting 2 s \
         after close)",
        waiting.map(|r| r.map(|r| r.map_err(|e| e.to_string())))
    );
}

/// `close()` is prompt even while the client waits for a WELCOME that does
/// not come (an overloaded or stuck gateway): it must not sit out the rest
/// of `connect_timeout` (10 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_prompt_during_the_handshake() {
    let fake = Fake::bind().await;
    let mut c = cfg(fake.addr(), "close-2", "t");
    c.connect_timeout = Duration::from_secs(10);
    let client = Client::start(c).unwrap();
    // The TCP connection is up and HELLO sent; the fake never answers.
    let _conn = fake.accept().await;
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(15), client.close()).await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "close() did not return within 15 s");
    assert!(
        took < Duration::from_secs(2),
        "close() took {took:?} while the client waited for WELCOME \
         (connect_timeout 10 s): closing is not watched during connect/handshake"
    );
}

/// The payload limit follows WELCOME's max_frame exactly: the largest
/// payload that fits in one frame is stored, one byte more is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limit_follows_welcome_max_frame() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame = 4_096).await;
    let token = gw.add_device("big-1").await;
    let client = Client::start(cfg(gw.addr(), "big-1", &token)).unwrap();
    let mut events = client.events();
    wait_event(&mut events, WAIT, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    // length field = type + flags + seq + timestamp + content type + payload
    let max = 4_096 - (2 + 8 + 8 + 1);
    match client.send(0, vec![7u8; max + 1]).await {
        Err(ClientError::TooLarge { len, max: m }) => {
            assert_eq!(len, max + 1);
            assert_eq!(m, max);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(client.send(0, vec![7u8; max]).await.unwrap(), 1);
    within(WAIT, "flush", client.flush()).await.unwrap();
    let row = support::stored_row(&gw.db_path(), "big-1", 1).expect("stored");
    assert_eq!(row.3.len(), max);
    client.close().await;
}

/// A reading queued before the first WELCOME (checked against the default
/// 65,536) may be too large for a gateway configured with a smaller
/// max_frame. The gateway answers ERROR FRAME_TOO_LARGE and closes; the
/// client must not resend it forever: the readings queued behind it are
/// delivered, and the client does not reconnect in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_queued_reading_does_not_block_the_outbox_forever() {
    let data = tempfile::tempdir().unwrap();
    let token = {
        let store = furrow::server::open_store(&furrow::Config {
            data_dir: data.path().to_path_buf(),
            ..furrow::Config::default()
        })
        .unwrap();
        furrow::devices::add_device(&store, "big-2").await.unwrap()
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = Client::start(cfg(addr, "big-2", &token)).unwrap();
    let mut events = client.events();
    // Accepted locally (no WELCOME yet: the default limit applies).
    assert_eq!(client.send(0, vec![1u8; 10_000]).await.unwrap(), 1);
    assert_eq!(client.send(1, json(2)).await.unwrap(), 2);
    let d = data.path().to_path_buf();
    let gw = TestGateway::start_with(|c| {
        c.listen = addr;
        c.data_dir = d;
        c.limits.max_frame = 4_096;
    })
    .await;
    let end = Instant::now() + Duration::from_secs(4);
    let (mut connects, mut errors) = (0, Vec::new());
    while let Ok(r) = tokio::time::timeout_at(end, events.recv()).await {
        match r {
            Ok(ClientEvent::Connected { .. }) => connects += 1,
            Ok(ClientEvent::Disconnected {
                reason: Disconnect::Error { code, message },
                ..
            }) if errors.len() < 3 => errors.push((code, message)),
            _ => {}
        }
    }
    let stored = support::stored_seqs_async(&gw.db_path(), "big-2").await;
    assert!(
        stored.contains(&2),
        "the valid reading 2, queued behind an oversized reading 1, was not stored within 4 s \
         (stored {stored:?}, pending {}); the client connected {connects} times, errors {errors:?}",
        client.pending()
    );
    assert!(
        connects <= 10,
        "{connects} sessions in 4 s: the client reconnects in a loop, each time resending a \
         reading the gateway refuses with {errors:?}"
    );
    client.close().await;
}
