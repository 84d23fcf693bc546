//! TLS through rustls, with certificates made by `openssl` at start: Redis
//! (`rediss://`, `Config::redis_ca_file`) against a private redis-server
//! with a TLS port, and Postgres (`sslmode=require`,
//! `Config::database_ca_file`) against a private server with `ssl = on`.

mod common;

use cacheaside::ErrorKind;
use common::servers::{PrivatePostgres, PrivateRedis, TestCerts, free_port};
use common::{Fixture, test_config};

/// A redis-server with a TLS port, and the URL of that port.
fn tls_redis(certs: &TestCerts) -> (PrivateRedis, String) {
    let port = free_port();
    let args = certs.redis_args(port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis = PrivateRedis::start_with(&args);
    (redis, format!("rediss://127.0.0.1:{port}/"))
}

#[test]
fn the_lab_works_over_rediss_with_a_named_ca() {
    let certs = TestCerts::new();
    let (_redis, url) = tls_redis(&certs);
    let mut config = test_config("tls_lab");
    config.redis_url = url;
    config.redis_ca_file = Some(certs.ca());
    let fx = Fixture::with(config);
    fx.client.engine().ping().expect("TLS handshake and PING");

    let before = fx.queries();
    let miss = fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(fx.queries(), before + 1, "a miss sends one statement");
    for _ in 0..10 {
        assert_eq!(fx.client.get_user_profile(1).unwrap().as_ref(), Some(&miss));
    }
    assert_eq!(fx.queries(), before + 1, "hits send none");

    fx.assert_cold_readers_cost_one_query(50);

    assert!(fx.client.update_user_plan(1, "pro").unwrap());
    assert_eq!(fx.client.get_user_profile(1).unwrap().unwrap().plan, "pro");
}

#[test]
fn a_wrong_ca_is_a_clear_error() {
    let certs = TestCerts::new();
    let (_redis, url) = tls_redis(&certs);
    let other = TestCerts::new();
    for ca in [Some(other.ca()), None] {
        let mut config = test_config("tls_wrong_ca");
        config.invalidation_relay = false;
        config.redis_url = url.clone();
        config.redis_ca_file = ca.clone();
        let engine = cacheaside::CacheAside::open(&config).expect("opens anyway");
        let err = engine.ping().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cache, "{err:?}");
        assert!(
            err.chain().contains("TLS handshake failed") && err.chain().contains("certificate"),
            "with CA {ca:?}: {}",
            err.chain()
        );
    }
}

#[test]
fn a_missing_ca_file_is_refused_at_open() {
    let mut config = test_config("tls_no_file");
    config.redis_url = "rediss://127.0.0.1:6380/".into();
    config.redis_ca_file = Some("/nonexistent/ca.pem".into());
    let err = cacheaside::CacheAside::open(&config)
        .err()
        .expect("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("redis_ca_file"), "{err}");
}

/// Whether the client's Postgres connection is encrypted.
fn on_tls(fx: &Fixture) -> bool {
    let row = fx
        .client
        .db()
        .query_opt(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .expect("our own backend");
    row.get(0)
}

#[test]
fn the_lab_works_with_postgres_over_tls_and_a_named_ca() {
    let certs = TestCerts::new();
    let pg = PrivatePostgres::start();
    pg.enable_tls(&certs);
    let mut config = test_config("pg_tls");
    config.database_url = format!("{}?sslmode=require", pg.url());
    config.database_ca_file = Some(certs.ca());
    let fx = Fixture::with(config);
    fx.client
        .engine()
        .ping()
        .expect("TLS handshake and SELECT 1");
    assert!(on_tls(&fx), "sslmode=require encrypts");
    let before = fx.queries();
    let miss = fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(fx.queries(), before + 1, "a miss sends one statement");
    assert_eq!(fx.client.get_user_profile(1).unwrap(), Some(miss));
    assert_eq!(fx.queries(), before + 1, "a hit sends none");

    // Without sslmode, as before: plain, even though the server offers TLS
    // (tokio-postgres's `prefer` would try it).
    let mut plain = test_config("pg_plain");
    plain.database_url = pg.url();
    let fx = Fixture::with(plain.clone());
    assert!(!on_tls(&fx), "no sslmode, no TLS");
    // A CA file does not quietly go unused: without sslmode=require it is
    // refused, not a plaintext connection.
    plain.database_ca_file = Some(certs.ca());
    let err = cacheaside::Client::open(&plain).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err:?}");
    assert!(err.to_string().contains("sslmode=require"), "{err}");
}

#[test]
fn postgres_with_a_wrong_ca_is_a_clear_error() {
    let certs = TestCerts::new();
    let pg = PrivatePostgres::start();
    pg.enable_tls(&certs);
    let other = TestCerts::new();
    for ca in [Some(other.ca()), None] {
        let mut config = test_config("pg_tls_wrong_ca");
        config.invalidation_relay = false;
        config.database_url = format!("{}?sslmode=require", pg.url());
        config.database_ca_file = ca.clone();
        let engine = cacheaside::CacheAside::open(&config).expect("opens anyway");
        let err = engine.ping().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Database, "{err:?}");
        assert!(
            err.chain().contains("TLS handshake failed") && err.chain().contains("certificate"),
            "with CA {ca:?}: {}",
            err.chain()
        );
    }
    let mut config = test_config("pg_tls_no_file");
    config.database_url = format!("{}?sslmode=require", pg.url());
    config.database_ca_file = Some("/nonexistent/ca.pem".into());
    let err = cacheaside::CacheAside::open(&config)
        .err()
        .expect("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("database_ca_file"), "{err}");
}
