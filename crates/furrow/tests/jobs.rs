//! Tags and fleet jobs end to end over real HTTP and real SDK devices:
//! tags and selectors through the API; a desired-state job over a tag
//! selector; and a command job over 1,000 devices at 600 a minute with a
//! tenth of them failing, stopped by its abort rule, with no device
//! started after the rule tripped and the API's counts equal to the
//! devices' own records.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use furrow_client::{handler, Client, CommandReply, Config as ClientConfig, DesiredHandler};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::Api;
use support::*;

async fn until_job(api: &Api, id: u64, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    within(limit, &format!("job {id}"), async {
        loop {
            let (st, v) = api.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

async fn all_job_devices(api: &Api, id: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => format!("/v1/jobs/{id}/devices?limit=1000"),
            Some(a) => format!("/v1/jobs/{id}/devices?limit=1000&after={a}"),
        };
        let (st, v) = api.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        out.extend(v["devices"].as_array().unwrap().iter().cloned());
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return out,
        }
    }
}

async fn patch(api: &Api, path: &str, body: Value) -> (StatusCode, Value) {
    api.call(reqwest::Method::PATCH, path, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_select_devices_and_a_desired_state_job_reaches_them() {
    let api = Api::start().await;
    let mut tokens = BTreeMap::new();
    for n in 0..6 {
        let id = format!("valve-{n}");
        tokens.insert(id.clone(), api.gw.add_device(&id).await);
        let site = if n < 4 { "north" } else { "south" };
        let (st, v) = patch(
            &api,
            &format!("/v1/devices/{id}/tags"),
            json!({"site": site, "model": "v2"}),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let (st, v) = patch(&api, "/v1/devices/valve-0/tags", json!({"model": null})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["tags"], json!({"site": "north"}));
    let (st, v) = patch(&api, "/v1/devices/valve-0/tags", json!({"bad:key": "x"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = patch(&api, "/v1/devices/valve-0/tags", json!({"n": 5})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (_, v) = api.get("/v1/devices?tag=site:north&tag=model:v2").await;
    let ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["valve-1", "valve-2", "valve-3"]);
    assert_eq!(
        v["devices"][0]["tags"],
        json!({"site": "north", "model": "v2"})
    );
    let (st, _) = api.get("/v1/devices?tag=nocolon").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = api.get("/v1/devices?color=red").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // Devices of the north site speak device state; valve-3 is offline.
    let mut clients = Vec::new();
    for n in 0..3 {
        let id = format!("valve-{n}");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let h: DesiredHandler = Arc::new(move |d| {
            let _ = tx.send(d);
        });
        let c = Arc::new(
            Client::start_with_handlers(
                ClientConfig::new(api.gw.addr().to_string(), id.clone(), tokens[&id].clone()),
                None,
                Some(h),
            )
            .unwrap(),
        );
        let echo = Arc::clone(&c);
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let _ = echo.report(d.document).await;
            }
        });
        clients.push(c);
    }
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({
                "target": {"tags": {"site": "north"}},
                "operation": {"desired": {"flow": 3}},
                "rate_per_minute": 0,
                "device_timeout_s": 30,
                "deadline_s": 30
            }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    assert_eq!(job["total"], 4);
    let id = job["job_id"].as_u64().unwrap();
    // The three online ones succeed; valve-3 waits for its connection.
    let v = until_job(&api, id, Duration::from_secs(20), |v| {
        v["counts"]["succeeded"] == 3
    })
    .await;
    assert_eq!(v["counts"]["in_progress"], 1);
    assert_eq!(v["status"], "running");
    let (_, s) = api.get("/v1/devices/valve-3/state").await;
    assert_eq!(s["desired"]["document"], json!({"flow": 3}));
    // valve-3 comes back: reached, applied, the job completes.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let h: DesiredHandler = Arc::new(move |d| {
        let _ = tx.send(d);
    });
    let late = Arc::new(
        Client::start_with_handlers(
            ClientConfig::new(
                api.gw.addr().to_string(),
                "valve-3",
                tokens["valve-3"].clone(),
            ),
            None,
            Some(h),
        )
        .unwrap(),
    );
    let echo = Arc::clone(&late);
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let _ = echo.report(d.document).await;
        }
    });
    let v = until_job(&api, id, Duration::from_secs(20), |v| {
        v["status"] == "completed"
    })
    .await;
    assert_eq!(v["counts"]["succeeded"], 4, "{v}");
    let (_, list) = api.get("/v1/jobs").await;
    assert_eq!(list["jobs"][0]["job_id"], id);
    // Bad requests are clear.
    for body in [
        json!({"target": {"tags": {}}, "operation": {"desired": {"a": 1}}}),
        json!({"target": {"devices": ["nobody"]}, "operation": {"desired": {"a": 1}}}),
        json!({"target": {"devices": ["valve-0"]}, "operation": {"reboot": {}}}),
        json!({"target": {"devices": ["valve-0"]}, "operation": {"desired": [1]}}),
        json!({"target": {"devices": ["valve-0"]}, "operation": {"command": {"name": "x"}},
               "abort": {"failed_pct": 500, "min_completed": 1}}),
    ] {
        let (st, v) = api.post("/v1/jobs", body.clone()).await;
        assert!(
            st == StatusCode::BAD_REQUEST || st == StatusCode::NOT_FOUND,
            "{body} -> {st} {v}"
        );
    }
    for c in clients.iter().chain([&late]) {
        c.close().await;
    }
}

/// The test: 1,000 devices, 600 a minute, a tenth failing, abort
/// above 5 % of at least 20 completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_1000_devices_stops_at_its_abort_rule() {
    const N: usize = 1000;
    let api = Api::start_with(|c| {
        c.limits.connect_rate_per_ip = 0;
        c.limits.max_connections = 2000;
    })
    .await;
    let store = api.gw.store();
    // Each device's own record: the commands it ran.
    let ran: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let mut clients = Vec::with_capacity(N);
    for n in 0..N {
        let id = format!("pump-{n:04}");
        let token = furrow::devices::add_device(&*store, &id).await.unwrap();
        store
            .set_tags(&id, [("fleet".to_owned(), Some("east".to_owned()))].into())
            .await
            .unwrap();
        let fails = furrow::jobs::in_share(&id, 0.1);
        let (me, ran) = (id.clone(), Arc::clone(&ran));
        let h = handler(move |cmd| {
            ran.lock()
                .unwrap()
                .entry(me.clone())
                .or_default()
                .push(cmd.id);
            async move {
                if fails {
                    CommandReply::failed("simulated failure")
                } else {
                    CommandReply::ok(1, "{}")
                }
            }
        });
        let mut cfg = ClientConfig::new(api.gw.addr().to_string(), id, token);
        cfg.backoff.initial = Duration::from_millis(50);
        clients.push(Client::start_with_handler(cfg, h).unwrap());
    }
    api.gw.wait_sessions(N, Duration::from_secs(60)).await;
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({
                "target": {"tags": {"fleet": "east"}},
                "operation": {"command": {"name": "update", "payload": {"to": "2.1"}}},
                "rate_per_minute": 600,
                "abort": {"failed_pct": 5, "min_completed": 20},
                "device_timeout_s": 30
            }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["job_id"].as_u64().unwrap();
    let v = until_job(&api, id, Duration::from_secs(120), |v| {
        v["status"] != "running" && v["counts"]["in_progress"] == 0
    })
    .await;
    assert_eq!(v["status"], "aborted", "{v}");
    eprintln!(
        "aborted: started {}, counts {}, reason {}",
        v["started"], v["counts"], v["reason"]
    );
    let started = v["started"].as_u64().unwrap();
    assert!(started < N as u64 / 2, "stopped early: {v}");
    let finished_ms = v["finished_ms"].as_u64().unwrap();
    // The devices' own records against the API's.
    let devices = all_job_devices(&api, id).await;
    assert_eq!(devices.len(), N);
    let ran = ran.lock().unwrap().clone();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for d in &devices {
        let dev = d["device_id"].as_str().unwrap();
        let state = d["state"].as_str().unwrap();
        *counts.entry(state.to_owned()).or_default() += 1;
        let runs = ran.get(dev).map_or(0, Vec::len);
        match state {
            "succeeded" | "failed" => {
                assert_eq!(runs, 1, "{dev} ran its command once: {d}");
                let want = if furrow::jobs::in_share(dev, 0.1) {
                    "failed"
                } else {
                    "succeeded"
                };
                assert_eq!(state, want, "{dev}");
                assert!(d["started_ms"].as_u64().unwrap() <= finished_ms);
            }
            "cancelled" if d["started_ms"].is_null() => {
                assert_eq!(runs, 0, "{dev} was never touched: {d}");
            }
            // Started before the rule tripped, its command cancelled while
            // still on its way: it may have run it (its answer then came
            // too late to count).
            "cancelled" => assert!(runs <= 1, "{dev}: {d}"),
            other => panic!("{dev}: {other} after the job settled: {d}"),
        }
    }
    // Nothing started after the rule tripped; the counts agree.
    let touched = devices
        .iter()
        .filter(|d| !d["started_ms"].is_null())
        .count() as u64;
    assert_eq!(touched, started);
    let cancelled_late = devices
        .iter()
        .filter(|d| d["state"] == "cancelled" && !d["started_ms"].is_null())
        .count() as u64;
    let outcomes =
        counts.get("succeeded").copied().unwrap_or(0) + counts.get("failed").copied().unwrap_or(0);
    assert!(
        ran.len() as u64 >= outcomes && ran.len() as u64 <= outcomes + cancelled_late,
        "every device with an outcome ran its command: {} ran, {outcomes} outcomes",
        ran.len()
    );
    assert_eq!(
        counts.get("succeeded").copied().unwrap_or(0),
        v["counts"]["succeeded"]
    );
    assert_eq!(
        counts.get("failed").copied().unwrap_or(0),
        v["counts"]["failed"]
    );
    assert_eq!(
        counts.get("cancelled").copied().unwrap_or(0),
        v["counts"]["cancelled"]
    );
    let failed = v["counts"]["failed"].as_u64().unwrap();
    let completed = failed + v["counts"]["succeeded"].as_u64().unwrap();
    assert!(completed >= 20 && failed * 100 > 5 * completed, "{v}");
    let m = api.metrics().await;
    assert!(m.contains("furrow_jobs_finished_total"), "{m}");
    for c in &clients {
        c.close().await;
    }
}

/// `furrow sim --state --fail-share`: simulated devices answer a job's
/// command (the failing share "failed") and echo desired state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_answers_jobs_and_echoes_desired_state() {
    let api = Api::start().await;
    let data = api.gw.config().data_dir.clone();
    let addr = api.gw.addr().to_string();
    let sim = furrow_cmd(&[
        "sim",
        "--addr",
        &addr,
        "--data-dir",
        data.to_str().unwrap(),
        "--devices",
        "20",
        "--rate",
        "1",
        "--duration",
        "8",
        "--state",
        "--fail-share",
        "0.5",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("furrow sim starts");
    api.gw.wait_sessions(20, Duration::from_secs(20)).await;
    let store = api.gw.store();
    let ids: Vec<String> = (0..20).map(|n| format!("sim-{n}")).collect();
    for id in &ids {
        store
            .set_tags(id, [("kind".to_owned(), Some("sim".to_owned()))].into())
            .await
            .unwrap();
    }
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({"target": {"tags": {"kind": "sim"}},
                   "operation": {"command": {"name": "check"}}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["job_id"].as_u64().unwrap();
    let v = until_job(&api, id, Duration::from_secs(20), |v| {
        v["status"] == "completed"
    })
    .await;
    let failing = ids
        .iter()
        .filter(|i| furrow::jobs::in_share(i, 0.5))
        .count() as u64;
    assert_eq!(v["counts"]["failed"], failing, "{v}");
    assert_eq!(v["counts"]["succeeded"], 20 - failing, "{v}");
    // Desired state comes back as reported.
    let (st, _) = patch(
        &api,
        "/v1/devices/sim-3/state/desired",
        json!({"valve": "open"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    within(Duration::from_secs(10), "sim-3 reports it", async {
        loop {
            let (_, s) = api.get("/v1/devices/sim-3/state").await;
            if s["reported"]["document"]["valve"] == "open" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let out = sim.wait_with_output().expect("furrow sim ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("commands answered 20"), "{text}");
    assert!(text.contains("desired states applied 1"), "{text}");
}
