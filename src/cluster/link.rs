//! HTTP/1 connections to other instances' internal listeners, each driven
//! by the call that uses it instead of by a task of its own.
//!
//! With a pooled client (`hyper_util`'s), a forwarded check hands its
//! request to the connection's task and gets the answer back through a
//! channel: two more task wake-ups per call, each a likely thread wake-up
//! at moderate rates, which is what a check costs on a VM (docs/benchmarks.md,
//! section 9). Here the calling task polls the connection itself while it
//! waits, so the socket's readiness wakes that task alone.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

type Body = Full<Bytes>;

/// Why an exchange gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the connection closed before the answer")]
    Closed,
}

/// Idle connections by address, each taken by one call at a time.
pub struct Links {
    idle: Mutex<HashMap<String, Vec<Link>>>,
    max_idle_per_address: usize,
    /// A connection idle longer is closed rather than reused: the other
    /// side may be closing it (its `server.header_timeout`), and a request
    /// sent into that close could not be told apart from one it received.
    max_idle_for: Duration,
}

struct Link {
    sender: SendRequest<Body>,
    conn: Connection<TokioIo<TcpStream>, Body>,
    idle_since: Instant,
    /// The connection's future has completed: never polled again.
    ended: bool,
}

/// A failed exchange, with the request back when it was never sent.
enum Failed {
    /// Boxed: the rare case, kept off the size of every result.
    Unsent(Box<Request<Body>>, LinkError),
    Sent(LinkError),
}

impl Links {
    pub fn new(max_idle_per_address: usize, max_idle_for: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_address,
            max_idle_for,
        }
    }

    /// Send `req` to `address` and read the whole answer. An idle
    /// connection is reused when one is open; a request it could not send
    /// (closed meanwhile) is sent once more on a new connection.
    pub async fn exchange(
        &self,
        address: &str,
        mut req: Request<Body>,
    ) -> Result<(StatusCode, Bytes), LinkError> {
        if let Some(mut link) = self.take(address) {
            match link.exchange(req).await {
                Ok(answer) => {
                    self.put(address, link);
                    return Ok(answer);
                }
                Err(Failed::Sent(e)) => return Err(e),
                Err(Failed::Unsent(back, _)) => req = *back,
            }
        }
        let mut link = Link::connect(address).await?;
        match link.exchange(req).await {
            Ok(answer) => {
                self.put(address, link);
                Ok(answer)
            }
            Err(Failed::Sent(e) | Failed::Unsent(_, e)) => Err(e),
        }
    }

    fn take(&self, address: &str) -> Option<Link> {
        let mut idle = self.idle.lock();
        let links = idle.get_mut(address)?;
        while let Some(mut link) = links.pop() {
            if !link.idle_longer_than(self.max_idle_for) && link.is_open() {
                return Some(link);
            }
        }
        None
    }

    fn put(&self, address: &str, mut link: Link) {
        if link.ended {
            return;
        }
        link.idle_since = Instant::now();
        let expired = |l: &Link| l.idle_longer_than(self.max_idle_for);
        let mut idle = self.idle.lock();
        if let Some(links) = idle.get_mut(address) {
            // Oldest first (calls take the newest): close the expired ones.
            while links.first().is_some_and(expired) {
                links.remove(0);
            }
            if links.len() < self.max_idle_per_address {
                links.push(link);
            }
            return;
        }
        // A new address (an owner restarted elsewhere): forget the
        // addresses nobody called lately, and close their connections.
        idle.retain(|_, links| links.last().is_some_and(|l| !expired(l)));
        idle.insert(address.to_owned(), vec![link]);
    }

    /// Idle connections kept for `address` (for tests).
    #[cfg(test)]
    fn idle_count(&self, address: &str) -> usize {
        self.idle.lock().get(address).map_or(0, Vec::len)
    }
}

impl Link {
    async fn connect(address: &str) -> Result<Self, LinkError> {
        let stream = TcpStream::connect(address)
            .await
            .map_err(LinkError::Connect)?;
        stream.set_nodelay(true).map_err(LinkError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Self {
            sender,
            conn,
            idle_since: Instant::now(),
            ended: false,
        })
    }

    fn idle_longer_than(&self, max: Duration) -> bool {
        self.idle_since.elapsed() >= max
    }

    /// Whether the idle connection can be used: one poll reads a close the
    /// other side sent meanwhile.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.ended = Pin::new(&mut self.conn).poll(&mut cx).is_ready();
        !self.ended && !self.sender.is_closed()
    }

    /// One request and its whole answer, driving the connection meanwhile.
    async fn exchange(&mut self, req: Request<Body>) -> Result<(StatusCode, Bytes), Failed> {
        let Self {
            sender,
            conn,
            ended,
            ..
        } = self;
        let mut call = pin!(async {
            if let Err(e) = sender.ready().await {
                return Err(Failed::Unsent(Box::new(req), e.into()));
            }
            let resp =
                sender
                    .try_send_request(req)
                    .await
                    .map_err(|mut e| match e.take_message() {
                        Some(req) => Failed::Unsent(Box::new(req), e.into_error().into()),
                        None => Failed::Sent(e.into_error().into()),
                    })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Failed::Sent(e.into()))?
                .to_bytes();
            Ok((status, body))
        });
        tokio::select! {
            biased;
            answer = &mut call => answer,
            _ = conn => {
                *ended = true;
                // The connection ended: the call has its outcome now (a
                // request given back unsent, the error, or the answer that
                // came with the close), if any.
                let mut cx = Context::from_waker(Waker::noop());
                match call.as_mut().poll(&mut cx) {
                    Poll::Ready(answer) => answer,
                    Poll::Pending => Err(Failed::Sent(LinkError::Closed)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::routing::post;
    use axum::Router;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;

    use super::*;

    /// A real HTTP server on loopback that echoes the body with a prefix,
    /// and counts the connections it accepted.
    async fn echo_server(close_after_each: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let app = Router::new().route(
            "/echo",
            post(|body: Bytes| async move { [b"echo:".as_slice(), &body].concat() }),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_after_each)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (address, accepted)
    }

    fn post_to(address: &str, body: &'static str) -> Request<Body> {
        Request::post(format!("http://{address}/echo"))
            .header("host", address)
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    }

    async fn answer(links: &Links, address: &str, body: &'static str) -> (StatusCode, Bytes) {
        links
            .exchange(address, post_to(address, body))
            .await
            .expect("answer")
    }

    #[tokio::test]
    async fn answers_as_the_pooled_client_does_and_reuses_one_connection() {
        let (address, accepted) = echo_server(false).await;
        let links = Links::new(4, Duration::from_secs(5));
        let reference: Client<HttpConnector, Body> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
        for body in ["a", "", "ünïcode", "x"] {
            let ours = answer(&links, &address, body).await;
            let theirs = reference
                .request(post_to(&address, body))
                .await
                .expect("reference answer");
            let status = theirs.status();
            let bytes = theirs
                .into_body()
                .collect()
                .await
                .expect("reference body")
                .to_bytes();
            assert_eq!(ours, (status, bytes));
        }
        // Ours used one connection for its four calls, the reference one.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(links.idle_count(&address), 1);
    }

    #[tokio::test]
    async fn a_connection_the_other_side_closed_is_replaced_and_the_call_answered() {
        let (address, accepted) = echo_server(true).await;
        let links = Links::new(4, Duration::from_secs(5));
        for _ in 0..3 {
            let (status, body) = answer(&links, &address, "hi").await;
            assert_eq!(
                (status, body.as_ref()),
                (StatusCode::OK, b"echo:hi".as_slice())
            );
            // Let the server's close reach us before the next call.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_idle_connection_past_its_age_is_not_reused() {
        let (address, accepted) = echo_server(false).await;
        let links = Links::new(4, Duration::from_millis(30));
        answer(&links, &address, "1").await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        answer(&links, &address, "2").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_to_an_address_nobody_calls_any_more_are_closed() {
        let (gone, _) = echo_server(false).await;
        let (new, _) = echo_server(false).await;
        let links = Links::new(4, Duration::from_millis(30));
        answer(&links, &gone, "1").await;
        assert_eq!(links.idle_count(&gone), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        answer(&links, &new, "2").await;
        assert_eq!((links.idle_count(&gone), links.idle_count(&new)), (0, 1));
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_error() {
        let address = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let links = Links::new(4, Duration::from_secs(5));
        let e = links
            .exchange(&address, post_to(&address, "x"))
            .await
            .expect_err("no server");
        assert!(matches!(e, LinkError::Connect(_)), "{e}");
    }
}
