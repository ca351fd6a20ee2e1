//! A fast, non-verifying stand-in for the CDP token API, for the mint-path benchmark
//! (`bench/mint-bench.sh`). The verifying fake lives in tests/integration/common.
//!
//! `cargo run --release --example bench_fake_cdp -- <port> [delay_ms]`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().as_deref().unwrap_or("18990").parse()?;
    let delay = Duration::from_millis(args.next().as_deref().unwrap_or("0").parse()?);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("fake CDP on 127.0.0.1:{port}, delay {delay:?}");
    let counter = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let counter = counter.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let counter = counter.clone();
                async move {
                    let _ = req.into_body().collect().await;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let body = format!(r#"{{"token":"bench-{n}","channel_id":""}}"#);
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().expect("static"));
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
