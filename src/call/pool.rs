//! Keep-alive HTTP/1.1 connections to the service, one request at a time on each.
//!
//! Fed by [`super::http`] with a request per record attempt; hands back the answer and a
//! [`Lease`] on its connection, which goes back to the pool once the answer's body is read.
//!
//! ferry called through hyper-util's pooled client until its cost per call showed: a SipHash
//! of the scheme and authority at every checkout and return, a race of the checkout against a
//! connect, and the machinery of both, on every request (about 5 % of ferry's instructions per
//! record). A sidecar calls one service, so this pool is a stack of idle connections per
//! destination, taken and given back under a lock held for a push or a pop.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// How long a connection may sit idle before the pool closes it (hyper-util's default is 90 s;
/// ferry kept 60 s before this pool).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// More idle connections than this to one destination are closed as they come back: a burst
/// that opened them has passed.
const MAX_IDLE: usize = 1024;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (or its TLS handshake failed): the request never left.
    #[error("cannot connect to {authority}")]
    Connect {
        authority: Authority,
        #[source]
        source: BoxError,
    },
    /// The URL has no host to connect to.
    #[error("the URL `{0}` names no host")]
    NoHost(Uri),
    /// The connection failed while the request was on it.
    #[error(transparent)]
    Request(#[from] hyper::Error),
}

/// Keep-alive connections to the service, per destination (scheme and authority).
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    idle_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per destination, its idle connections, most recently used last: taken from the end, so
    /// that a low rate keeps using a few warm connections and the rest age out at the front.
    idle: hashbrown::HashMap<Destination, Vec<Idle>>,
    /// Whether a task is closing the connections idle too long.
    reaping: bool,
}

type Destination = (bool, Authority);

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

enum Connector {
    Plain(HttpConnector),
    Tls(HttpsConnector<HttpConnector>),
}

impl Pool {
    /// A pool that connects in plain text, or through rustls with `tls` (then `https://` only).
    pub fn new(tls: Option<rustls::ClientConfig>) -> Pool {
        Pool::with_idle_timeout(tls, IDLE_TIMEOUT)
    }

    /// The same, closing connections idle for `idle_timeout` (tests shorten it).
    pub fn with_idle_timeout(tls: Option<rustls::ClientConfig>, idle_timeout: Duration) -> Pool {
        let mut tcp = HttpConnector::new();
        // Requests are small and latency matters: no Nagle.
        tcp.set_nodelay(true);
        let connector = match tls {
            None => Connector::Plain(tcp),
            Some(config) => {
                // The TLS layer sees the scheme; the TCP connector must accept `https` URIs.
                tcp.enforce_http(false);
                Connector::Tls(
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(config)
                        .https_only()
                        .enable_http1()
                        .wrap_connector(tcp),
                )
            }
        };
        Pool {
            shared: Arc::new(Shared {
                connector,
                idle_timeout,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Sends `request` (its URI absolute) on an idle connection to its destination, or on a new
    /// one. A request that a reused connection closed before taking is sent again on another:
    /// the service never saw it, and a keep-alive connection it closed while idle is no failure.
    pub async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lease<'_>), SendError> {
        let uri = request.uri().clone();
        let Some(authority) = uri.authority().cloned() else {
            return Err(SendError::NoHost(uri));
        };
        let destination = (uri.scheme() == Some(&Scheme::HTTPS), authority);
        if !request.headers().contains_key(HOST)
            && let Some(host) = host_header(&uri)
        {
            request.headers_mut().insert(HOST, host);
        }
        // HTTP/1.1 to a server (not a proxy) names the path alone.
        *request.uri_mut() = origin_form(&uri);
        loop {
            let (mut sender, reused) = match self.take(&destination) {
                Some(sender) => (sender, true),
                None => (self.connect(&uri, &destination.1).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: self,
                        destination,
                        sender,
                    };
                    return Ok((response, lease));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Request(failed.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to `destination` that is open and ready.
    fn take(&self, destination: &Destination) -> Option<SendRequest<Full<Bytes>>> {
        let mut state = self.shared.lock();
        let connections = state.idle.get_mut(destination)?;
        while let Some(idle) = connections.pop() {
            if idle.since.elapsed() >= self.shared.idle_timeout {
                // Those below it are older still. A service that closes idle connections
                // itself (nginx after 75 s) would be likelier to close one as ferry writes.
                connections.clear();
                return None;
            }
            // Not ready is a connection the service closed while it sat idle.
            if idle.sender.is_ready() {
                return Some(idle.sender);
            }
        }
        None
    }

    async fn connect(&self, uri: &Uri, authority: &Authority) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let failed = |source: BoxError| SendError::Connect {
            authority: authority.clone(),
            source,
        };
        let io: Io = match &self.shared.connector {
            Connector::Plain(c) => {
                MaybeHttpsStream::Http(call(c.clone(), uri.clone()).await.map_err(failed)?)
            }
            Connector::Tls(c) => call(c.clone(), uri.clone()).await.map_err(failed)?,
        };
        let (sender, connection) = http1::handshake(io).await.map_err(|e| failed(Box::new(e)))?;
        // The connection's reads and writes run as a task of their own for as long as it lives;
        // it ends when the service closes it or the pool lets go of its sender.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Connection to the service ended");
            }
        });
        Ok(sender)
    }

    fn give_back(&self, destination: Destination, mut sender: SendRequest<Full<Bytes>>) {
        if sender.is_ready() {
            self.shared.idle(destination, sender);
        } else if !sender.is_closed() {
            // hyper has yet to see the end of the answer it just delivered (seldom: it sees it
            // as it hands the last bytes over); the connection is idle once it has, not before,
            // so that no call waits on it.
            let shared = Arc::downgrade(&self.shared);
            tokio::spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(shared) = shared.upgrade()
                {
                    shared.idle(destination, sender);
                }
            });
        }
    }

    /// How many connections sit idle, for tests.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.lock().idle.values().map(Vec::len).sum()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it, and a pool is worth keeping even then.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stacks a connection ready for its next request.
    fn idle(self: &Arc<Self>, destination: Destination, sender: SendRequest<Full<Bytes>>) {
        let mut state = self.lock();
        let connections = state.idle.entry(destination).or_default();
        if connections.len() >= MAX_IDLE {
            return;
        }
        connections.push(Idle {
            sender,
            since: Instant::now(),
        });
        if !state.reaping {
            state.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// A connection carrying an answer: [`Lease::give_back`] once its body is read to the end.
/// Dropped otherwise (a body left unread, a call given up), it closes the connection, whose
/// next bytes would be the rest of this answer.
pub struct Lease<'a> {
    pool: &'a Pool,
    destination: Destination,
    sender: SendRequest<Full<Bytes>>,
}

impl Lease<'_> {
    pub fn give_back(self) {
        self.pool.give_back(self.destination, self.sender);
    }
}

/// Closes the connections idle longer than the pool's timeout, and those the service closed,
/// as long as there are idle connections and the pool lives.
async fn reap(shared: Weak<Shared>) {
    let period = match shared.upgrade() {
        Some(s) => s.idle_timeout,
        None => return,
    };
    // A reaper stopped from outside (its runtime shut down under a pool that lives on) lets
    // the next connection given back start another.
    let mut running = Reaping(shared.clone());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let now = Instant::now();
        state.idle.retain(|_, connections| {
            connections.retain(|c| now.duration_since(c.since) < period && !c.sender.is_closed());
            !connections.is_empty()
        });
        if state.idle.is_empty() {
            state.reaping = false;
            running.0 = Weak::new();
            return;
        }
    }
}

/// Marks the pool as without a reaper when its reaper ends other than by its own choice.
struct Reaping(Weak<Shared>);

impl Drop for Reaping {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.lock().reaping = false;
        }
    }
}

async fn call<S>(mut connector: S, uri: Uri) -> Result<S::Response, BoxError>
where
    S: Service<Uri>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| connector.poll_ready(cx)).await.map_err(Into::into)?;
    connector.call(uri).await.map_err(Into::into)
}

/// `uri`'s path and query, as a request to a server (not a proxy) names its target.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

/// The Host header for `uri`: its host, and its port unless the scheme's default.
pub(super) fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let secure = uri.scheme() == Some(&Scheme::HTTPS);
    let value = match uri.port_u16() {
        Some(443) if secure => host.to_string(),
        Some(80) if !secure => host.to_string(),
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 service on loopback that answers `ok` to every request, after `delay`, and
    /// counts the connections it accepted and saw closed.
    pub(in crate::call) struct Service {
        pub url: String,
        pub accepted: Arc<AtomicUsize>,
        pub closed: Arc<AtomicUsize>,
        /// Each request's line and Host header.
        seen: Arc<Mutex<Vec<(String, String)>>>,
    }

    async fn service(delay: Duration, close_after_answer: bool) -> Service {
        answering(b"ok".to_vec(), delay, close_after_answer).await
    }

    /// The service, answering `body` instead.
    pub(in crate::call) async fn answering(
        body: Vec<u8>,
        delay: Duration,
        close_after_answer: bool,
    ) -> Service {
        let answer = [
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
            body,
        ]
        .concat();
        let answer: Arc<[u8]> = answer.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/h?x=1", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, c, s) = (accepted.clone(), closed.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let (c, s, answer) = (c.clone(), s.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut socket = BufReader::new(socket);
                    loop {
                        let mut line = String::new();
                        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let (mut host, mut length) = (String::new(), 0);
                        loop {
                            let mut header = String::new();
                            socket.read_line(&mut header).await.unwrap();
                            let header = header.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            let (name, value) = header.split_once(':').unwrap();
                            match name.to_ascii_lowercase().as_str() {
                                "host" => host = value.trim().to_string(),
                                "content-length" => length = value.trim().parse().unwrap(),
                                _ => {}
                            }
                        }
                        let mut body = vec![0; length];
                        socket.read_exact(&mut body).await.unwrap();
                        s.lock().unwrap().push((line.trim_end().to_string(), host));
                        tokio::time::sleep(delay).await;
                        if socket.get_mut().write_all(&answer).await.is_err() {
                            // The client went away mid-answer.
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if close_after_answer {
                            return;
                        }
                    }
                });
            }
        });
        Service {
            url,
            accepted,
            closed,
            seen,
        }
    }

    /// Waits up to 5 s for `condition`: what the other end of a socket sees takes a moment,
    /// longer on a loaded machine.
    pub(in crate::call) async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn post(url: &str) -> Request<Full<Bytes>> {
        Request::post(url)
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap()
    }

    /// One request and its whole answer; the connection goes back.
    async fn exchange(pool: &Pool, url: &str) -> Bytes {
        let (response, connection) = pool.send(post(url)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        connection.give_back();
        body
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_and_name_the_path_and_host() {
        let service = service(Duration::ZERO, false).await;
        let pool = Pool::new(None);
        for _ in 0..5 {
            assert_eq!(exchange(&pool, &service.url).await, "ok");
        }
        assert_eq!(service.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
        let host = service.url.split('/').nth(2).unwrap().to_string();
        let seen = service.seen.lock().unwrap().clone();
        assert_eq!(seen, vec![("POST /h?x=1 HTTP/1.1".to_string(), host); 5]);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_later_requests_reuse() {
        let service = service(Duration::from_millis(100), false).await;
        let pool = Pool::new(None);
        let four = (0..4).map(|_| exchange(&pool, &service.url));
        for body in futures::future::join_all(four).await {
            assert_eq!(body, "ok");
        }
        assert_eq!(service.accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle(), 4);
        exchange(&pool, &service.url).await;
        assert_eq!(service.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_while_idle_is_replaced_not_a_failure() {
        let service = service(Duration::ZERO, true).await;
        let pool = Pool::new(None);
        for n in 1..=3 {
            assert_eq!(exchange(&pool, &service.url).await, "ok");
            // Until hyper has seen the end of the connection, as it would while it sat idle.
            eventually("the pool sees the connection closed", || {
                pool.shared
                    .lock()
                    .idle
                    .values()
                    .flatten()
                    .all(|c| c.sender.is_closed())
            })
            .await;
            assert_eq!(service.accepted.load(Ordering::SeqCst), n);
        }
    }

    #[tokio::test]
    async fn a_connection_whose_answer_was_not_read_is_closed_not_reused() {
        let service = service(Duration::ZERO, false).await;
        let pool = Pool::new(None);
        let (response, connection) = pool.send(post(&service.url)).await.unwrap();
        drop((response, connection));
        assert_eq!(exchange(&pool, &service.url).await, "ok");
        assert_eq!(service.accepted.load(Ordering::SeqCst), 2);
        eventually("the service sees the first connection closed", || {
            service.closed.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_that_failed_on_a_new_connection_is_not_sent_again() {
        // A service that takes connections and closes them at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/h", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        let pool = Pool::new(None);
        let error = match pool.send(post(&url)).await {
            Err(e) => e,
            Ok(_) => panic!("the service closed the connection without an answer"),
        };
        assert!(matches!(error, SendError::Request(_)), "{error:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_idle_longer_than_the_timeout_are_closed() {
        let service = service(Duration::ZERO, false).await;
        let pool = Pool::with_idle_timeout(None, Duration::from_millis(100));
        exchange(&pool, &service.url).await;
        assert_eq!(pool.idle(), 1);
        // Reaped at the first tick after the timeout: within two timeouts.
        eventually("the idle connection is closed", || {
            pool.idle() == 0 && service.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        // And a new one is opened for the next request.
        assert_eq!(exchange(&pool, &service.url).await, "ok");
        assert_eq!(service.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error_that_never_reached_the_service() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pool = Pool::new(None);
        let error = match pool.send(post(&format!("http://127.0.0.1:{port}/h"))).await {
            Err(e) => e,
            Ok(_) => panic!("nothing listens on {port}"),
        };
        assert!(matches!(error, SendError::Connect { .. }), "{error:?}");
        assert!(super::super::never_reached(&error), "{error:?}");
    }
}
