//! A real headless Chromium, driven over WebDriver by Debian's `chromedriver`
//! (packages `chromium` and `chromium-driver`, which `scripts/test.sh`
//! installs when missing): the console's end-to-end tests.
//!
//! Each [`Browser`] runs its own chromedriver (on a free loopback port, in
//! its own process group so that dropping it kills Chromium too) with a
//! throwaway profile. Waits are bounded and poll the page with a script:
//! a page that never gets there fails the test with a screenshot and the
//! console's last message. Screenshots go to
//! `target/tmp/console-screenshots/` (or `$FURROW_SCREENSHOTS`).
//!
//! Not in `support/mod.rs`: only the browser tests include it (with
//! `#[path]`), so no other test binary carries axe-core.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::support::free_port;

/// The longest a page may take to show what a test waits for.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// axe-core 4.14.1 (MPL-2.0, `tests/fixtures/axe-core/`), the accessibility
/// rules engine of Deque's axe, injected into pages by [`Browser::axe`].
const AXE: &str = include_str!("../fixtures/axe-core/axe.min.js");

/// One browser tests take turns with: two Chromiums at once on a small
/// machine make both slow enough to miss their waits.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A headless Chromium session and the chromedriver behind it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    shots: PathBuf,
    prefix: String,
    _profile: tempfile::TempDir,
}

/// Where screenshots are written.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("FURROW_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Tests have a target/tmp; examples (console_load) the OS's.
            option_env!("CARGO_TARGET_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join("console-screenshots")
        })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width` × `height`
    /// CSS pixels; screenshots are named `<prefix>-<name>.png`.
    pub async fn start(prefix: &str, width: u32, height: u32) -> Self {
        Self::start_with(prefix, width, height, &[]).await
    }

    /// Like [`Self::start`], with more Chromium switches.
    pub async fn start_with(prefix: &str, width: u32, height: u32, switches: &[&str]) -> Self {
        let driver_bin = which("chromedriver").unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: the console's browser tests need Debian's \
                 chromium and chromium-driver (scripts/test.sh installs them)"
            )
        });
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PAGE_TIMEOUT;
        let mut args = vec![
            "--headless=new".to_owned(),
            // Root in a container: Chromium's sandbox needs user namespaces.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-extensions".into(),
            "--disable-background-networking".into(),
            "--lang=en-GB".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        args.extend(switches.iter().map(|s| s.to_string()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": which("chromium").map(|p| p.display().to_string()).unwrap_or_default(),
                "args": args,
            }),
        );
        let client = loop {
            let conn = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(conn)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("chromedriver not ready: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver on {url}: {e}"),
            }
        };
        let shots = screenshot_dir();
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Self {
            client,
            driver,
            shots,
            prefix: prefix.to_owned(),
            _profile: profile,
        }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` (a function body returning a boolean) until it is
    /// true; fails the test, with a screenshot, after [`PAGE_TIMEOUT`].
    pub async fn wait_js(&self, what: &str, script: &str, args: Vec<Value>) {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            if let Ok(Value::Bool(true)) = self.client.execute(script, args.clone()).await {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(what).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element `[data-testid=testid]` is in the page.
    pub async fn wait_testid(&self, testid: &str) -> Element {
        self.wait_css(&format!("[data-testid=\"{testid}\"]")).await
    }

    /// Waits until an element matching `css` is in the page and shown.
    pub async fn wait_css(&self, css: &str) -> Element {
        self.wait_js(
            &format!("an element {css} is shown"),
            "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0;",
            vec![json!(css)],
        )
        .await;
        self.client
            .find(Locator::Css(css))
            .await
            .expect("the element it waited for")
    }

    /// The text of the first `[data-testid=testid]`, or None.
    pub async fn text(&self, testid: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(`[data-testid=\"${arguments[0]}\"]`); return e ? e.textContent : null;",
                vec![json!(testid)],
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// Waits until the text of `[data-testid=testid]` is `want`.
    pub async fn wait_text(&self, testid: &str, want: &str) {
        self.wait_js(
            &format!("{testid} reads {want:?}"),
            "const e = document.querySelector(`[data-testid=\"${arguments[0]}\"]`); return !!e && e.textContent.trim() === arguments[1];",
            vec![json!(testid), json!(want)],
        )
        .await;
    }

    /// Waits until the text of the first element matching `css` contains
    /// `text`.
    pub async fn wait_contains(&self, css: &str, text: &str) {
        self.wait_js(
            &format!("{css} containing {text:?}"),
            "return (document.querySelector(arguments[0])?.textContent ?? '').includes(arguments[1]);",
            vec![json!(css), json!(text)],
        )
        .await;
    }

    /// Clicks `[data-testid=testid]` once it is shown.
    pub async fn click(&self, testid: &str) {
        self.click_css(&format!("[data-testid=\"{testid}\"]")).await;
    }

    /// Clicks the first element matching `css` once it is shown, scrolled
    /// to the middle of the window first as a user would (a click at the
    /// window's edge could land on the sticky message bar instead).
    pub async fn click_css(&self, css: &str) {
        let e = self.wait_css(css).await;
        self.js(
            "arguments[0].scrollIntoView({ block: 'center' }); return true;",
            vec![serde_json::to_value(&e).expect("element as JSON")],
        )
        .await;
        e.click()
            .await
            .unwrap_or_else(|err| panic!("click {css}: {err}"));
    }

    /// Types `text` into `[data-testid=testid]` (after clearing it).
    pub async fn type_into(&self, testid: &str, text: &str) {
        let e = self.wait_testid(testid).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    /// Writes a screenshot of the window; its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let path = self.shots.join(format!("{}-{name}.png", self.prefix));
        self.screenshot_to(&path).await;
        path
    }

    /// Writes a screenshot of the window to `path`.
    pub async fn screenshot_to(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }

    /// The console's last message (its live region).
    pub async fn announced(&self) -> String {
        let v = self
            .js(
                "return document.getElementById('announce')?.textContent ?? '';",
                vec![],
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn fail(&self, what: &str) -> ! {
        let shot = self.screenshot("failed").await;
        let said = self.announced().await;
        let url = self.client.current_url().await.map(|u| u.to_string());
        panic!(
            "the page never showed: {what}\n  at {url:?}\n  console said: {said:?}\n  screenshot: {}",
            shot.display()
        );
    }

    /// Runs axe-core on the page as it is now; the violations of impact
    /// `serious` or `critical`, each as "rule: help (targets)". Every
    /// violation is printed.
    pub async fn axe(&self, page: &str) -> Vec<String> {
        let loaded = self
            .js("return typeof window.axe === 'object';", vec![])
            .await;
        if loaded != Value::Bool(true) {
            // WebDriver's scripts are not subject to the page's CSP.
            self.js(&format!("{AXE}\nreturn true;"), vec![]).await;
        }
        let out = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                   .then((r) => done(r.violations.map((v) => ({
                       id: v.id, impact: v.impact, help: v.help,
                       targets: v.nodes.slice(0, 5).map((n) => n.target.join(' ')),
                   }))))
                   .catch((e) => done({ error: String(e) }));",
                vec![],
            )
            .await
            .expect("axe.run");
        let list = match out {
            Value::Array(list) => list,
            other => panic!("axe failed on {page}: {other}"),
        };
        let mut serious = Vec::new();
        for v in &list {
            let line = format!("{}: {} ({})", v["id"], v["help"], v["targets"]);
            eprintln!("axe on {page}: {} {line}", v["impact"]);
            if matches!(v["impact"].as_str(), Some("serious" | "critical")) {
                serious.push(line);
            }
        }
        serious
    }

    /// Ends the session: Chromium quits, then chromedriver is stopped.
    pub async fn close(self) {
        // Closing the last window ends a chromedriver session. (Not
        // `Client::close`: it waits for every clone of the client, and
        // `self` holds one.)
        let _ = self.client.close_window().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole process group: chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `name` on $PATH (or /usr/bin, /usr/lib/chromium).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/bin"),
            PathBuf::from("/usr/lib/chromium"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
