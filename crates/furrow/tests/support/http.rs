//! A test gateway with an HTTP client for its API, authenticated with the
//! admin token when one is configured.

use reqwest::StatusCode;
use serde_json::Value;

use super::TestGateway;

/// The admin token of [`Api::with_token`] gateways.
pub const TOKEN: &str = "an-admin-token-for-tests";

/// A gateway and a client for its API.
pub struct Api {
    /// The HTTP client.
    pub http: reqwest::Client,
    /// The gateway.
    pub gw: TestGateway,
    token: Option<&'static str>,
}

impl Api {
    /// A gateway whose API needs no token (loopback).
    pub async fn start() -> Self {
        Self {
            http: reqwest::Client::new(),
            gw: TestGateway::start().await,
            token: None,
        }
    }

    /// A gateway whose configuration `tweak` may change; its API needs no
    /// token.
    pub async fn start_with(tweak: impl FnOnce(&mut furrow::Config)) -> Self {
        Self {
            http: reqwest::Client::new(),
            gw: TestGateway::start_with(tweak).await,
            token: None,
        }
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let mut req = self.http.get(self.gw.api_url("/metrics"));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("GET /metrics");
        assert!(resp.status().is_success(), "{}", resp.status());
        resp.text().await.expect("metrics text")
    }

    /// A gateway whose API needs [`TOKEN`]; requests carry it.
    pub async fn with_token() -> Self {
        Self::with_token_and(|_| {}).await
    }

    /// Like [`Self::with_token`], with `tweak` applied to the configuration.
    pub async fn with_token_and(tweak: impl FnOnce(&mut furrow::Config)) -> Self {
        Self {
            http: reqwest::Client::new(),
            gw: TestGateway::start_with(|c| {
                c.api.token = TOKEN.into();
                tweak(c);
            })
            .await,
            token: Some(TOKEN),
        }
    }

    /// A request with a JSON answer (which it must be).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.gw.api_url(path));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        (status, v)
    }

    /// GET.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

/// The status of `GET url`; 0 when it does not answer within 5 s.
pub async fn status_of(client: &reqwest::Client, url: &str) -> u16 {
    match client
        .get(url)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until `GET url` answers `want`; fails with `what` after `limit`.
pub async fn until_status(
    client: &reqwest::Client,
    url: &str,
    want: u16,
    limit: std::time::Duration,
    what: &str,
) {
    super::within(limit, what, async {
        while status_of(client, url).await != want {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}
