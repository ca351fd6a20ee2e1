//! A tiny page server on 127.0.0.1 for the browser tests (the app, another website, a
//! Coinbase stand-in): HTTP/1.1, optionally TLS with the gateway's own test leaf, every
//! request recorded. Runs on the test's runtime and stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::certs::TestPki;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// What a page answers: status, response headers, body.
pub type Answer = (StatusCode, Vec<(&'static str, String)>, String);
/// What the server calls per request.
type Handler = Arc<dyn Fn(&Request<Incoming>) -> Answer + Send + Sync>;
/// A page.
pub type Page = fn(&Request<Incoming>) -> Answer;
/// An HTML page: status and body (`text/html`, `no-store`).
pub type HtmlPage = fn(&Request<Incoming>) -> (StatusCode, String);

pub struct PageServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl PageServer {
    /// Serves `page`, over TLS with `tls` when given.
    pub async fn start(page: Page, tls: Option<tokio_rustls::TlsAcceptor>) -> PageServer {
        Self::serve(Arc::new(page), tls).await
    }

    /// Serves an HTML `page` (`Content-Type: text/html`, `Cache-Control: no-store`).
    pub async fn html(page: HtmlPage, tls: Option<tokio_rustls::TlsAcceptor>) -> PageServer {
        Self::serve(
            Arc::new(move |req: &Request<Incoming>| {
                let (status, body) = page(req);
                let headers = vec![
                    ("content-type", "text/html; charset=utf-8".to_string()),
                    ("cache-control", "no-store".to_string()),
                ];
                (status, headers, body)
            }),
            tls,
        )
        .await
    }

    async fn serve(page: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, tls, page) = (log.clone(), tls.clone(), page.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (log, page) = (log.clone(), page.clone());
                        async move {
                            log.lock().unwrap().push(Seen {
                                path_and_query: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: req.headers().clone(),
                            });
                            let (status, headers, body) = page(&req);
                            let mut b = Response::builder().status(status);
                            for (k, v) in headers {
                                b = b.header(k, v);
                            }
                            Ok::<_, Infallible>(
                                b.body(Full::new(Bytes::from(body))).expect("response"),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        PageServer { addr, seen, task }
    }

    /// Requests received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TLS with the gateway's own test leaf: Chromium accepts it for any host name only
/// because its key is the pinned one (`CertTrust::pin_leaf_of`).
pub fn tls_acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    pki.acceptor(&[b"http/1.1"])
}
