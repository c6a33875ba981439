//! A fleet job across three `furrow serve` instances behind HAProxy on one
//! throwaway PostgreSQL, with real programs only. 300 SDK devices connect
//! through HAProxy; a command job over all of them runs at 1,200 a minute;
//! one instance is killed with SIGKILL mid-job. Its devices come back on
//! the others, the surviving instances go on ticking the job, and in the
//! end every device ran the job's command exactly once and the job counts
//! 300 succeeded.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use furrow::store::{FleetStore, PostgresOptions, PostgresStore};
use furrow_client::{handler, Client, CommandReply, Config as ClientConfig};
use serde_json::{json, Value};
use support::haproxy::Haproxy;
use support::postgres::Postgres;
use support::process::GatewayProcess;
use support::*;

const DEVICES: usize = 300;

async fn job_of(http: &reqwest::Client, api: SocketAddr, id: u64) -> Value {
    http.get(format!("http://{api}/v1/jobs/{id}"))
        .send()
        .await
        .expect("GET job")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_across_three_instances_survives_a_kill() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut gateways = Vec::new();
    for n in 1..=3 {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let name = format!("gw-{n}");
        let mut gw = GatewayProcess::spawn_with_env(
            dir.path(),
            &name,
            listen,
            &["--database", &url, "--proxy-protocol"],
            &[
                ("FURROW_SESSIONS__HEARTBEAT_MS", "250"),
                ("FURROW_SESSIONS__INSTANCE_TIMEOUT_MS", "1500"),
                ("FURROW_LIMITS__CONNECT_RATE_PER_IP", "0"),
            ],
        );
        gw.ready(&http).await;
        gateways.push((name, listen, gw));
    }
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let servers: Vec<(String, SocketAddr, u16)> = gateways
        .iter()
        .map(|(name, listen, gw)| (name.clone(), *listen, gw.api.port()))
        .collect();
    let _haproxy = Haproxy::in_front_of(front, "127.0.0.5", &servers);

    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .expect("store");
    // Each device's own record: the commands its handler ran.
    let ran: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let mut clients = Vec::new();
    for i in 0..DEVICES {
        let id = format!("west-{i:03}");
        let token = furrow::devices::add_device(&store, &id)
            .await
            .expect("provision");
        store
            .set_tags(&id, [("fleet".to_owned(), Some("west".to_owned()))].into())
            .await
            .expect("tag");
        let mut c = ClientConfig::new(front.to_string(), id.clone(), token);
        c.backoff.initial = Duration::from_millis(50);
        c.backoff.max = Duration::from_millis(500);
        let (me, ran) = (id.clone(), Arc::clone(&ran));
        clients.push(
            Client::start_with_handler(
                c,
                handler(move |cmd| {
                    ran.lock()
                        .unwrap()
                        .entry(me.clone())
                        .or_default()
                        .push(cmd.id);
                    async move { CommandReply::ok(1, "{}") }
                }),
            )
            .expect("client"),
        );
    }
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    within(Duration::from_secs(60), "300 devices online", async {
        loop {
            let n: i64 = db
                .query_one("SELECT count(*) FROM sessions", &[])
                .await
                .unwrap()
                .get(0);
            if n as usize == DEVICES {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // The job, created through instance 1.
    let api1 = gateways[0].2.api;
    let job: Value = http
        .post(format!("http://{api1}/v1/jobs"))
        .json(&json!({
            "target": {"tags": {"fleet": "west"}},
            "operation": {"command": {"name": "update", "payload": {"to": "2.1"}}},
            "rate_per_minute": 1200,
            "device_timeout_s": 60
        }))
        .send()
        .await
        .expect("POST job")
        .json()
        .await
        .expect("JSON");
    let id = job["job_id"].as_u64().expect("a job");
    assert_eq!(job["total"], DEVICES);

    // Mid-job, kill instance 2.
    within(
        Duration::from_secs(60),
        "a third of the job started",
        async {
            while job_of(&http, api1, id).await["started"]
                .as_u64()
                .unwrap_or(0)
                < 100
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    gateways[1].2.child.kill().expect("SIGKILL");
    let _ = gateways[1].2.child.wait();

    let v = within(Duration::from_secs(120), "the job completes", async {
        loop {
            let v = job_of(&http, api1, id).await;
            if v["status"] == "completed" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(v["counts"]["succeeded"], DEVICES, "{v}");
    assert_eq!(v["started"], DEVICES, "{v}");
    // Every device ran the command exactly once, and it was this job's.
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), DEVICES);
    let cmds: BTreeMap<i64, i64> = db
        .query(
            "SELECT device, command_id FROM job_devices WHERE job = $1",
            &[&(id as i64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(cmds.len(), DEVICES);
    for (dev, runs) in &ran {
        assert_eq!(runs.len(), 1, "{dev} ran {runs:?}");
    }
    let distinct: std::collections::BTreeSet<u64> = ran.values().map(|r| r[0]).collect();
    assert_eq!(distinct.len(), DEVICES, "one command per device");
    let jobs_commands: std::collections::BTreeSet<u64> = cmds.values().map(|c| *c as u64).collect();
    assert_eq!(distinct, jobs_commands);
    // Instance 3 sees the same job.
    let v3 = job_of(&http, gateways[2].2.api, id).await;
    assert_eq!(v3["counts"], v["counts"]);
    for c in &clients {
        c.close().await;
    }
}
