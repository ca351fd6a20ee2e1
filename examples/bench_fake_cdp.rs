//! A fast, non-verifying stand-in for the CDP token API, for the mint-path benchmark
//! (`bench/mint-bench.sh`). The verifying fake lives in tests/integration/common.
//!
//! `cargo run --release --example bench_fake_cdp -- <port> [delay_ms]`
//!
//! Plain HTTP/1.1 by default. With `CDP_TLS_CERT` and `CDP_TLS_KEY` (PEM paths) it serves
//! HTTPS with ALPN `h2` and `http/1.1`, as the real API does, so the gateway's client
//! multiplexes its calls on one HTTP/2 connection instead of opening one connection per
//! call in flight. Every second in which something changed, and on SIGINT/SIGTERM, it
//! prints how many TCP connections it accepted and how many requests it answered (and how
//! many of those came over HTTP/2), so the script can tell how the gateway connected.
//! `CDP_H2_MAX_STREAMS` sets the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` it advertises
//! (default: hyper's, 200); calls past it wait in the client for a free stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    h2_requests: AtomicU64,
}

impl Counters {
    fn line(&self) -> String {
        format!(
            "connections accepted: {}, requests: {}, over h2: {}",
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.h2_requests.load(Ordering::Relaxed)
        )
    }
}

fn tls_acceptor(
    cert: &str,
    key: &str,
) -> Result<tokio_rustls::TlsAcceptor, Box<dyn std::error::Error>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().as_deref().unwrap_or("18990").parse()?;
    let delay = Duration::from_millis(args.next().as_deref().unwrap_or("0").parse()?);
    let tls = match (std::env::var("CDP_TLS_CERT"), std::env::var("CDP_TLS_KEY")) {
        (Ok(cert), Ok(key)) => Some(tls_acceptor(&cert, &key)?),
        _ => None,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "fake CDP on 127.0.0.1:{port} ({}), delay {delay:?}",
        if tls.is_some() {
            "https, ALPN h2 + http/1.1"
        } else {
            "plain http/1.1"
        }
    );
    let max_streams: Option<u32> = match std::env::var("CDP_H2_MAX_STREAMS") {
        Ok(v) => Some(v.parse()?),
        Err(_) => None,
    };
    let counters = Arc::new(Counters::default());

    let reporter = counters.clone();
    tokio::spawn(async move {
        let mut last = String::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let line = reporter.line();
            if line != last {
                println!("{line}");
                last = line;
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let counters = counters.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let counters = counters.clone();
                async move {
                    if req.version() == hyper::Version::HTTP_2 {
                        counters.h2_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = req.into_body().collect().await;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let n = counters.requests.fetch_add(1, Ordering::Relaxed);
                    let body = format!(r#"{{"token":"bench-{n}","channel_id":""}}"#);
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().expect("static"));
                    Ok::<_, Infallible>(r)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Some(n) = max_streams {
                builder.http2().max_concurrent_streams(n);
            }
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .http1_only()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
    println!("final: {}", counters.line());
    Ok(())
}
