//! The operator's console (`/ui/`) in a real headless Chromium, driven over
//! WebDriver: an operator signs in, watches the overview's numbers move
//! while a simulated fleet (`furrow sim`, on the device SDK) streams, finds
//! a device, reads its telemetry chart, sends it a command that the SDK
//! device answers, and revokes it; a `read` token sees the same pages and
//! can change nothing; axe-core finds no serious accessibility violation.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh
//! installs them); fails, never skips, without them. Screenshots of each
//! step go to `target/tmp/console-screenshots/` (`$FURROW_SCREENSHOTS`).

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::process::{Child, Stdio};

use browser::{Browser, ONE_AT_A_TIME};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::furrow_cmd;
use support::http::{Api, TOKEN};

/// `furrow sim` streaming for the devices of `file`, killed on drop.
struct Sim(Child);

impl Sim {
    fn start(api: &Api, file: &std::path::Path, devices: usize, rate: u32) -> Self {
        let addr = api.gw.addr().to_string();
        let log = file.with_file_name("sim.log");
        eprintln!("furrow sim's output: {}", log.display());
        let child = furrow_cmd(&[
            "sim",
            "--addr",
            &addr,
            "--devices-file",
            file.to_str().unwrap(),
            "--devices",
            &devices.to_string(),
            "--rate",
            &rate.to_string(),
            "--payload-bytes",
            "60",
            "--duration",
            "300",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("start furrow sim");
        Self(child)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Provisions `ids` through the API; a `device_id token` file for `furrow sim`.
async fn provision(api: &Api, ids: &[String], dir: &std::path::Path) -> std::path::PathBuf {
    let mut lines = String::new();
    for id in ids {
        let (st, v) = api.post("/v1/devices", json!({ "device_id": id })).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        lines.push_str(&format!("{id} {}\n", v["token"].as_str().unwrap()));
    }
    let file = dir.join("devices.txt");
    std::fs::write(&file, lines).unwrap();
    file
}

/// Signs in on the console's sign-in form with `token`.
async fn sign_in(b: &Browser, api: &Api, token: &str) {
    b.goto(&api.gw.api_url("/ui/")).await;
    b.type_into("signin-token", token).await;
    b.click("signin-submit").await;
}

/// A number shown by the console ("1,234" or "12.5"), or None for "—".
fn shown_number(text: &str) -> Option<f64> {
    text.replace(',', "").trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_the_fleet_then_commands_and_revokes_a_device() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("pump-{i}")).collect();
    let file = provision(&api, &ids, dir.path()).await;

    let b = Browser::start("operator", 1280, 900).await;
    sign_in(&b, &api, TOKEN).await;
    b.wait_text("overview-total", "12").await;
    b.wait_text("overview-online", "0").await;
    assert_eq!(b.text("overview-offline").await.as_deref(), Some("12"));
    // Marks this page load: still there later means nothing reloaded.
    b.js("window.__sameLoad = true; return true;", vec![]).await;

    // The fleet comes online and streams: the overview follows by itself.
    let _sim = Sim::start(&api, &file, ids.len(), 4);
    b.wait_text("overview-online", "12").await;
    b.wait_js(
        "the acknowledged rate above zero",
        "const t = document.querySelector('[data-testid=overview-rate]')?.textContent ?? '';
         return Number(t.replace(/,/g, '')) > 0;",
        vec![],
    )
    .await;
    assert_eq!(
        b.js("return window.__sameLoad === true;", vec![]).await,
        json!(true),
        "the overview updated without reloading the page"
    );
    let connections = b.text("overview-connections").await.unwrap_or_default();
    assert_eq!(shown_number(&connections), Some(12.0), "{connections}");
    let p99 = b.text("overview-p99").await.unwrap_or_default();
    assert!(shown_number(&p99).is_some(), "ACK p99 shown: {p99:?}");
    b.wait_css("[data-testid=storage-health]").await;
    b.screenshot("overview").await;

    // Find a device by searching its id.
    b.wait_css("a[data-nav=devices]")
        .await
        .click()
        .await
        .unwrap();
    b.type_into("device-search", "pump-1").await;
    b.wait_js(
        "the search lists pump-1, pump-10 and pump-11",
        "const ids = [...document.querySelectorAll('[data-testid=device-row]')].map((r) => r.dataset.deviceId);
         return ids.join() === 'pump-1,pump-10,pump-11';",
        vec![],
    )
    .await;
    b.screenshot("devices").await;

    // Its page: online, with a chart of its readings' numeric field.
    b.wait_css("tr[data-device-id='pump-1'] a")
        .await
        .click()
        .await
        .unwrap();
    b.wait_text("device-status", "online").await;
    b.wait_js(
        "a telemetry chart with a line",
        "const svg = document.querySelector('svg[data-testid=telemetry-chart]');
         return !!svg && svg.querySelectorAll('path, polyline').length > 0;",
        vec![],
    )
    .await;
    let rows = b
        .js(
            "return document.querySelectorAll('[data-testid=telemetry-table] tbody tr').length;",
            vec![],
        )
        .await;
    assert!(rows.as_u64().unwrap_or(0) > 0, "telemetry rows: {rows}");
    let legend = b
        .js(
            "return document.querySelector('fieldset.legend')?.textContent ?? '';",
            vec![],
        )
        .await;
    assert!(
        legend.as_str().unwrap_or_default().contains('v'),
        "the JSON field v is plotted: {legend}"
    );

    // A command to the SDK device: queued, delivered, answered.
    b.type_into("command-name", "reboot").await;
    b.type_into("command-payload", r#"{"delay_s": 1}"#).await;
    b.click("command-send").await;
    b.wait_css("tr[data-testid=command-row][data-status=succeeded]")
        .await;
    b.screenshot("device").await;
    let (_, cmds) = api.get("/v1/devices/pump-1/commands").await;
    assert_eq!(cmds["commands"][0]["name"], "reboot", "{cmds}");
    assert_eq!(cmds["commands"][0]["state"], "succeeded", "{cmds}");

    // Revoke, through the confirmation.
    b.click("revoke-button").await;
    b.wait_css("dialog#confirm[open]").await;
    b.screenshot("revoke-confirm").await;
    b.click("confirm-yes").await;
    b.wait_text("device-status", "offline").await;
    b.wait_js(
        "the revoke button gone",
        "const e = document.querySelector('[data-testid=revoke-button]'); return !e || e.hidden;",
        vec![],
    )
    .await;
    let (_, dev) = api.get("/v1/devices/pump-1").await;
    assert!(dev["revoked_ms"].is_u64(), "revoked: {dev}");
    assert_eq!(dev["online"], false, "{dev}");
    let said = b.announced().await;
    assert!(said.contains("revoked"), "{said}");

    // Readable on a phone: nothing wider than the screen.
    b.client.set_window_size(390, 844).await.unwrap();
    for (page, wait) in [
        ("#/", "overview-online"),
        ("#/devices", "device-row"),
        ("#/devices/pump-2", "telemetry-chart"),
    ] {
        b.goto(&api.gw.api_url(&format!("/ui/{page}"))).await;
        b.wait_testid(wait).await;
        let fits = b
            .js(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
                vec![],
            )
            .await;
        assert_eq!(fits, json!(true), "{page} fits a 390 px wide screen");
    }
    b.screenshot("device-phone").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_sees_the_console_and_changes_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    let token = api.gw.add_device("tank-1").await;
    let (_dev, _) = api.gw.connect_device("tank-1", &token).await;
    api.gw.wait_online("tank-1").await;
    let (st, v) = api
        .post("/v1/devices/tank-1/commands", json!({ "name": "open" }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = api
        .post("/v1/api-tokens", json!({ "name": "wall", "role": "read" }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let read = v["token"].as_str().unwrap().to_owned();

    let b = Browser::start("read", 1280, 900).await;

    // A wrong token is refused and the form stays.
    sign_in(&b, &api, "not-a-token").await;
    b.wait_contains("#announce", "401").await;
    b.wait_testid("signin-token").await;

    sign_in(&b, &api, &read).await;
    b.wait_text("overview-online", "1").await;
    b.wait_testid("readonly-note").await;

    b.goto(&api.gw.api_url("/ui/#/devices/tank-1")).await;
    b.wait_text("device-status", "online").await;
    b.wait_css("tr[data-testid=command-row]").await;
    let controls = b
        .js(
            "return ['revoke-button', 'rotate-button', 'command-send', 'desired-save', 'tag-save']
               .filter((t) => { const e = document.querySelector(`[data-testid=${t}]`); return e && e.getClientRects().length; });",
            vec![],
        )
        .await;
    assert_eq!(controls, json!([]), "no control that changes something");
    b.screenshot("device").await;

    // And the API refuses the token what the page does not offer.
    let tries = b
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const auth = { Authorization: `Bearer ${sessionStorage.getItem('furrow.token')}`, 'Content-Type': 'application/json' };
             const calls = [
               ['POST', '/v1/devices/tank-1/revoke', {}],
               ['POST', '/v1/devices/tank-1/commands', { name: 'reboot' }],
               ['POST', '/v1/devices', { device_id: 'intruder' }],
               ['PATCH', '/v1/devices/tank-1/state/desired', { valve: 'open' }],
               ['DELETE', '/v1/devices/tank-1', null],
             ];
             Promise.all(calls.map(([method, path, body]) => fetch(path, {
               method, headers: auth, body: body === null ? undefined : JSON.stringify(body),
             }).then((r) => r.status))).then(done, (e) => done(String(e)));",
            vec![],
        )
        .await
        .unwrap();
    let statuses: Vec<u64> = tries
        .as_array()
        .unwrap_or_else(|| panic!("{tries}"))
        .iter()
        .map(|s| s.as_u64().unwrap_or(0))
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 403 || *s == 405),
        "every change refused: {statuses:?}"
    );
    let (_, dev) = api.get("/v1/devices/tank-1").await;
    assert!(dev["revoked_ms"].is_null(), "{dev}");
    let (_, cmds) = api.get("/v1/devices/tank-1/commands").await;
    assert_eq!(cmds["commands"].as_array().map(Vec::len), Some(1), "{cmds}");
    let (st, _) = api.get("/v1/devices/intruder").await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Signing out forgets the token.
    b.click_css("#signout").await;
    b.wait_testid("signin-token").await;
    let kept = b
        .js("return sessionStorage.getItem('furrow.token');", vec![])
        .await;
    assert_eq!(kept, Value::Null);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_has_no_serious_accessibility_violations() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    let token = api.gw.add_device("meter-1").await;
    let (mut dev, _) = api.gw.connect_device("meter-1", &token).await;
    for seq in 1..=20 {
        dev.telemetry(seq, &format!(r#"{{"kwh": {seq}.5, "volts": 230}}"#))
            .await;
    }
    dev.until_ack(20).await;
    api.post("/v1/devices/meter-1/commands", json!({ "name": "read" }))
        .await;
    let (st, v) = api
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/meter-1/tags",
            Some(json!({ "site": "north" })),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({ "target": {"devices": ["meter-1"]}, "operation": {"desired": {"tariff": "night"}} }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let job_page = format!("#/jobs/{}", job["job_id"]);

    let b = Browser::start("a11y", 1280, 900).await;
    let mut found = Vec::new();
    b.goto(&api.gw.api_url("/ui/")).await;
    b.wait_testid("signin-token").await;
    found.extend(b.axe("sign-in").await);
    sign_in(&b, &api, TOKEN).await;
    b.wait_text("overview-online", "1").await;
    found.extend(b.axe("overview").await);
    for (page, wait) in [
        ("#/devices", "device-row"),
        ("#/devices/meter-1", "telemetry-chart"),
        ("#/jobs", "jobs-table"),
        ("#/firmware", "firmware-table"),
        (&job_page, "job-devices-table"),
    ] {
        b.goto(&api.gw.api_url(&format!("/ui/{page}"))).await;
        b.wait_testid(wait).await;
        found.extend(b.axe(page).await);
    }
    // The confirmation dialog, open.
    b.goto(&api.gw.api_url("/ui/#/devices/meter-1")).await;
    b.click("revoke-button").await;
    b.wait_css("dialog#confirm[open]").await;
    found.extend(b.axe("the revoke dialog").await);

    // Keyboard: the first Tab reaches the skip link.
    b.goto(&api.gw.api_url("/ui/")).await;
    b.wait_testid("overview-online").await;
    b.js("document.activeElement?.blur(); return true;", vec![])
        .await;
    b.client
        .active_element()
        .await
        .unwrap()
        .send_keys("\u{E004}")
        .await
        .unwrap();
    let first = b
        .js("return document.activeElement?.id ?? '';", vec![])
        .await;
    assert_eq!(first, json!("skip"), "the first Tab stop is the skip link");
    // The check itself can fail: a field without a label is found.
    b.js(
        "document.getElementById('view').append(Object.assign(document.createElement('input'), { id: 'unlabelled' })); return true;",
        vec![],
    )
    .await;
    let planted = b.axe("a page with an unlabelled field").await;
    assert!(
        planted
            .iter()
            .any(|v| v.contains("label") && v.contains("unlabelled")),
        "axe finds the planted violation: {planted:?}"
    );
    b.close().await;

    // The same pages in the dark colour scheme (their own colours, their
    // own contrast).
    let b = Browser::start_with(
        "a11y-dark",
        1280,
        900,
        &["--blink-settings=preferredColorScheme=0"],
    )
    .await;
    sign_in(&b, &api, TOKEN).await;
    b.wait_text("overview-online", "1").await;
    let dark = b
        .js(
            "return matchMedia('(prefers-color-scheme: dark)').matches;",
            vec![],
        )
        .await;
    assert_eq!(dark, json!(true), "the dark scheme is on");
    found.extend(b.axe("overview, dark").await);
    b.goto(&api.gw.api_url("/ui/#/devices/meter-1")).await;
    b.wait_testid("telemetry-chart").await;
    found.extend(b.axe("device page, dark").await);
    b.screenshot("device-dark").await;
    b.close().await;
    assert!(
        found.is_empty(),
        "serious accessibility violations: {found:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_pages_and_filters_on_the_server() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    // 120 devices: three pages of 50; every tenth tagged site:north.
    for i in 0..120 {
        let id = format!("node-{i:03}");
        let (st, v) = api.post("/v1/devices", json!({ "device_id": id })).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        if i % 10 == 0 {
            api.call(
                reqwest::Method::PATCH,
                &format!("/v1/devices/{id}/tags"),
                Some(json!({ "site": "north" })),
            )
            .await;
        }
    }
    let token = api.gw.add_device("online-1").await;
    let (_dev, _) = api.gw.connect_device("online-1", &token).await;
    api.gw.wait_online("online-1").await;

    let b = Browser::start("list", 1280, 900).await;
    sign_in(&b, &api, TOKEN).await;
    b.wait_text("overview-total", "121").await;
    b.click_css("a[data-nav=devices]").await;
    let ids = "return [...document.querySelectorAll('[data-testid=device-row]')].map((r) => r.dataset.deviceId);";
    let page_is = |first: &'static str, n: usize| {
        format!(
            "const ids = [...document.querySelectorAll('[data-testid=device-row]')].map((r) => r.dataset.deviceId);
             return ids.length === {n} && ids[0] === '{first}';"
        )
    };
    b.wait_js("page 1", &page_is("node-000", 50), vec![]).await;
    b.click("next-page").await;
    b.wait_js("page 2", &page_is("node-050", 50), vec![]).await;
    b.click("next-page").await;
    b.wait_js("page 3", &page_is("node-100", 21), vec![]).await;
    let next_off = b
        .js(
            "return document.querySelector('[data-testid=next-page]').disabled;",
            vec![],
        )
        .await;
    assert_eq!(next_off, json!(true), "no page after the last");
    b.click("prev-page").await;
    b.wait_js("back on page 2", &page_is("node-050", 50), vec![])
        .await;

    // Filters: online only; a tag; a prefix with no match.
    b.wait_testid("device-online")
        .await
        .select_by_value("true")
        .await
        .unwrap();
    b.wait_js("online only", &page_is("online-1", 1), vec![])
        .await;
    b.wait_testid("device-online")
        .await
        .select_by_value("")
        .await
        .unwrap();
    b.type_into("device-tag", "site:north\n").await;
    b.wait_js("site:north only", &page_is("node-000", 12), vec![])
        .await;
    let tagged = b.js(ids, vec![]).await;
    assert!(
        tagged
            .as_array()
            .unwrap()
            .iter()
            .all(|id| id.as_str().unwrap().ends_with('0')),
        "{tagged}"
    );
    b.type_into("device-tag", "nope\n").await;
    b.wait_js(
        "a malformed tag refused in place",
        "return document.querySelector('[data-testid=device-tag]').getAttribute('aria-invalid') === 'true';",
        vec![],
    )
    .await;
    b.type_into("device-tag", "\n").await;
    b.type_into("device-search", "zzz").await;
    b.wait_js(
        "no device matches",
        "return document.querySelectorAll('[data-testid=device-row]').length === 0
            && document.querySelector('[data-testid=device-table] td.empty') !== null;",
        vec![],
    )
    .await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_edits_tags_and_desired_state_and_rotates_a_token() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    api.gw.add_device("valve-1").await;

    let b = Browser::start("admin", 1280, 900).await;
    sign_in(&b, &api, TOKEN).await;
    b.wait_testid("overview-online").await;
    b.goto(&api.gw.api_url("/ui/#/devices/valve-1")).await;
    b.wait_text("device-status", "offline").await;

    // A tag.
    b.type_into("tag-key", "site").await;
    b.type_into("tag-value", "east").await;
    b.click("tag-save").await;
    b.wait_contains("[data-testid=device-tags]", "site:east")
        .await;
    let (_, dev) = api.get("/v1/devices/valve-1").await;
    assert_eq!(dev["tags"], json!({ "site": "east" }), "{dev}");

    // The desired state, edited as JSON and saved as a merge patch.
    b.type_into("desired-editor", r#"{"valve": "open", "interval_s": 30}"#)
        .await;
    b.click("desired-save").await;
    b.wait_contains("[data-testid=state-desired]", r#""valve": "open""#)
        .await;
    let (_, state) = api.get("/v1/devices/valve-1/state").await;
    assert_eq!(
        state["desired"]["document"],
        json!({ "valve": "open", "interval_s": 30 }),
        "{state}"
    );
    // Someone else changes it meanwhile: the console's save does not
    // overwrite theirs.
    let (st, v) = api
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/valve-1/state/desired",
            Some(json!({ "interval_s": 60 })),
        )
        .await;
    assert!(st.is_success(), "{v}");
    b.type_into("desired-editor", r#"{"valve": "closed", "interval_s": 30}"#)
        .await;
    b.click("desired-save").await;
    b.wait_contains("#announce", "changed the desired state first")
        .await;
    let (_, state) = api.get("/v1/devices/valve-1/state").await;
    assert_eq!(
        state["desired"]["document"],
        json!({ "valve": "open", "interval_s": 60 }),
        "{state}"
    );

    // Rotate the token, through the confirmation: shown once, and it works.
    b.click("rotate-button").await;
    b.wait_css("dialog#confirm[open]").await;
    b.click("confirm-yes").await;
    let shown = b.wait_testid("new-token").await;
    let token = shown.prop("value").await.unwrap().unwrap_or_default();
    assert!(token.len() >= 32, "a token: {token:?}");
    b.screenshot("rotated").await;
    let (_dev, _) = api.gw.connect_device("valve-1", &token).await;
    api.gw.wait_online("valve-1").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_follows_a_job_and_cancels_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let api = Api::with_token().await;
    let token = api.gw.add_device("j-1").await;
    api.gw.add_device("j-2").await;
    let (_dev, _) = api.gw.connect_device("j-1", &token).await;
    api.gw.wait_online("j-1").await;
    // A command job: j-1 gets it (and never answers), j-2 is offline.
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({ "target": {"devices": ["j-1", "j-2"]}, "operation": {"command": {"name": "flush"}} }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["job_id"].as_u64().unwrap();

    let b = Browser::start("job", 1280, 900).await;
    sign_in(&b, &api, TOKEN).await;
    b.wait_testid("overview-online").await;
    b.click_css("a[data-nav=jobs]").await;
    b.click_css(&format!("tr[data-job-id='{id}'] a")).await;
    b.wait_text("job-status", "running").await;
    b.wait_js(
        "both devices listed",
        "return document.querySelectorAll('[data-testid=job-device-row]').length === 2;",
        vec![],
    )
    .await;
    b.screenshot("job").await;
    b.click("cancel-button").await;
    b.wait_css("dialog#confirm[open]").await;
    b.click("confirm-yes").await;
    b.wait_text("job-status", "cancelled").await;
    let (_, job) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    b.close().await;
}
