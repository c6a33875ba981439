//! TLS to PostgreSQL (`store/postgres/tls.rs`): libpq's `sslmode` and
//! `sslrootcert` in the database URL, against a throwaway PostgreSQL with
//! `ssl=on` that refuses plain TCP (`hostnossl ... reject`), with
//! certificates from `furrow certs` (its library).

mod support;

use furrow::certs::Ca;
use furrow::store::{PostgresOptions, PostgresStore};
use support::postgres::Postgres;
use support::*;

/// A CA file in `dir`; its path.
fn ca_file(dir: &std::path::Path, name: &str, ca: &Ca) -> String {
    let p = dir.join(name);
    std::fs::write(&p, &ca.cert_pem).unwrap();
    p.to_string_lossy().into_owned()
}

async fn connect(url: &str) -> Result<PostgresStore, String> {
    PostgresStore::connect(url, PostgresOptions::default())
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_encrypted_and_a_gateway_runs_over_it() {
    let ca = Ca::new("furrow test CA", 1).unwrap();
    let server = ca
        .server(&["127.0.0.1".to_owned(), "localhost".to_owned()], 1)
        .unwrap();
    let pg = Postgres::start_tls(&server.cert_pem, &server.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca_file(dir.path(), "ca.pem", &ca)
    );
    let store = connect(&url).await.expect("verify-full with the right CA");
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the connection is encrypted");
    let version: String = row.get(1);
    assert!(version.starts_with("TLSv1."), "{version}");
    drop(client);
    drop(store);

    // The whole gateway (its pool, writer and the cluster's LISTEN
    // connection) over TLS: a device gets in and its readings are stored.
    let gw = TestGateway::start_with({
        let url = url.clone();
        move |c| c.database_url = url
    })
    .await;
    let token = gw.add_device("tls-db-1").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("tls-db-1", &token, 30).await;
    dev.telemetry_batch(1..=5).await;
    dev.until_ack(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_a_wrong_name_and_plain_tcp_are_refused() {
    let ca = Ca::new("furrow test CA", 1).unwrap();
    // A certificate for another host name than the one connected to.
    let server = ca.server(&["db.example".to_owned()], 1).unwrap();
    let pg = Postgres::start_tls(&server.cert_pem, &server.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let right = ca_file(dir.path(), "ca.pem", &ca);
    let other = Ca::new("another CA", 1).unwrap();
    let wrong = ca_file(dir.path(), "other.pem", &other);

    let e = connect(&format!(
        "{}?sslmode=verify-full&sslrootcert={wrong}",
        pg.url()
    ))
    .await
    .expect_err("a certificate from another CA is refused");
    assert!(e.contains("certificate"), "{e}");
    let e = connect(&format!(
        "{}?sslmode=verify-ca&sslrootcert={wrong}",
        pg.url()
    ))
    .await
    .expect_err("verify-ca refuses another CA too");
    assert!(e.contains("certificate"), "{e}");
    let e = connect(&format!(
        "{}?sslmode=verify-full&sslrootcert={right}",
        pg.url()
    ))
    .await
    .expect_err("verify-full checks the name: db.example is not 127.0.0.1");
    assert!(e.contains("certificate"), "{e}");
    // verify-ca checks the chain only; require does not check at all.
    connect(&format!(
        "{}?sslmode=verify-ca&sslrootcert={right}",
        pg.url()
    ))
    .await
    .expect("verify-ca with the right CA");
    connect(&format!("{}?sslmode=require", pg.url()))
        .await
        .expect("require encrypts without checking");
    // The server takes no plain TCP: disable is refused by it.
    let e = connect(&format!("{}?sslmode=disable", pg.url()))
        .await
        .expect_err("plain TCP is refused by this server");
    assert!(
        e.contains("pg_hba.conf") || e.contains("no encryption"),
        "{e}"
    );
}
