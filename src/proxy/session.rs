//! One client session after authentication: attach a server connection, relay bytes both
//! ways, and give the server back at the right moment — at the end of each transaction in
//! transaction mode, when the client leaves in session mode.
//!
//! The relay parses only message headers (tag and length) on the way through, and bodies of
//! the few server messages it must read (ReadyForQuery, ParameterStatus). Large messages are
//! passed through in pieces, so a huge row or COPY stream never sits whole in memory. One
//! event loop polls reads and writes of both sockets at once, with bounded buffers, so
//! neither side can block the other into a deadlock.

use super::cancel::{send_cancel, BackendTarget, CancelSlot};
use super::pool::{Checkout, CheckoutError, Pool, PoolKey};
use super::prepared::{self, ClientStatements, Replies, Step};
use super::startup::{Authenticated, Target};
use super::stream::ClientStream;
use super::Proxy;
use crate::config::PoolMode;
use crate::protocol::backend::{self, RouterError};
use crate::protocol::framing::{self, FrameError};
use crate::protocol::sqlstate;
use crate::routing::pause::{GatePass, Held, PauseGate};
use crate::routing::replica;
use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long a server may take to finish replying after its client left.
const DRAIN_ON_EXIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Bytes queued towards one side before the relay stops reading from the other.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 32 * 1024;
const IDLE_READ_CHUNK: usize = 2 * 1024;

/// How a stretch of relaying with one server connection ended.
enum Attached {
    /// Transaction mode: the transaction ended and the server went back to the pool.
    Released,
    /// The client sent Terminate or closed its socket.
    ClientGone,
    /// The server closed or failed; the client must be told and closed.
    ServerGone,
    /// The client broke the protocol; it has been sent a FATAL error.
    ClientBroke(RouterError),
    /// The router is shutting down and the session was at a clean point.
    Shutdown,
    /// Session mode: the tenant is pausing (a live move, an operator) and the session was
    /// between transactions; it gives up its server session and carries over to a new one.
    Pausing,
}

/// Per-direction scanning state.
#[derive(Default)]
struct Scan {
    /// Bytes of the current message still to pass through (a large message in pieces).
    remaining: usize,
}

pub struct Session<'a> {
    proxy: &'a Proxy,
    client: ClientStream,
    auth: Authenticated,
    slot: Arc<CancelSlot>,
    client_id: u64,
    /// Signature of `auth.params`, kept current as the client's parameters change.
    params_sig: u64,
    pool: Arc<Pool>,
    route: Arc<crate::routing::TenantRoute>,
    /// The routing table generation `route` was last checked against.
    route_seen: u64,
    /// Bytes read from the client, not yet scanned.
    cin: BytesMut,
    /// Scanned client bytes waiting to be written to the server.
    cout: BytesMut,
    sin: BytesMut,
    sout: BytesMut,
    cscan: Scan,
    sscan: Scan,
    status: u8,
    terminate: bool,
    /// Transaction mode between transactions: the router refused the client's batch at its
    /// first Parse; what it sends up to its Sync is dropped, as a server drops what follows a
    /// failed message.
    skip_to_sync: bool,
    /// Bytes of a client message being dropped that have not arrived yet.
    skip_bytes: usize,
    mode: PoolMode,
    /// The replies still expected from the server, in order (both modes); in transaction
    /// mode also the client's named statements.
    replies: Replies,
    stmts: ClientStatements,
    /// The tenant's pause gate, and the pass held while a transaction runs.
    gate: Arc<PauseGate>,
    pass: Option<GatePass>,
    /// Bytes and request timing, flushed to the pool's tenant stats at each ReadyForQuery.
    meter: crate::metrics::Meter,
}

impl<'a> Session<'a> {
    pub fn new(
        proxy: &'a Proxy,
        client: ClientStream,
        auth: Authenticated,
        slot: Arc<CancelSlot>,
        client_id: u64,
        pool: Arc<Pool>,
        leftover: BytesMut,
    ) -> Self {
        let route = auth.tenant.clone();
        // Fixed for the session's life: the tenant's own mode, else its pod's, else the config's.
        let mode = route.pool_mode(proxy.settings().mode);
        let params_sig = super::server::params_signature(&auth.params);
        let gate = proxy.gates.get(&route.name);
        Session {
            gate,
            pass: None,
            mode,
            proxy,
            client,
            auth,
            slot,
            client_id,
            params_sig,
            pool,
            route,
            route_seen: u64::MAX, // never: the first checkout looks the tenant up
            cin: leftover,
            cout: BytesMut::new(),
            sin: BytesMut::new(),
            sout: BytesMut::new(),
            cscan: Scan::default(),
            sscan: Scan::default(),
            status: b'I',
            terminate: false,
            skip_to_sync: false,
            skip_bytes: 0,
            stmts: ClientStatements::default(),
            replies: Replies::default(),
            meter: Default::default(),
        }
    }

    fn mode(&self) -> PoolMode {
        self.mode
    }

    /// Server connection for the client's next stretch of work, with its session
    /// parameters brought in line. Re-reads the route so a changed route takes effect at the
    /// next transaction.
    async fn attach(&mut self) -> Result<Checkout, RouterError> {
        // Through the tenant's gate first: a paused tenant holds the client here, and the
        // route read below is the one in force when the pause ended.
        if self.pass.is_none() {
            let pass = match self.gate.try_enter() {
                Some(pass) => pass,
                None => {
                    let s = self.proxy.settings();
                    self.gate
                        .enter(s.pause_hold, s.max_held_clients)
                        .await
                        .map_err(|held| paused_error(&self.route.name, held))?
                }
            };
            self.pass = Some(pass);
        }
        let table = self.proxy.table.load();
        if table.generation != self.route_seen {
            if let Some(current) = table.tenant(&self.route.name) {
                if !Arc::ptr_eq(current, &self.route) {
                    self.route = current.clone();
                }
            }
            self.route_seen = table.generation;
        }
        drop(table);
        let settings = self.proxy.settings();
        // The primary, unless the client asked for a replica and one is fit for reads (the
        // documented fallback is the primary). Pools are per endpoint, so a failover or a
        // replica falling behind moves the next checkout without touching open ones.
        let endpoint = match self.auth.target {
            Target::Replica => replica::readable(
                &self.route.pod,
                &self.proxy.health.load(),
                settings.max_replica_lag,
                self.client_id,
            ),
            Target::Primary => None,
        }
        .unwrap_or(&self.route.pod.primary);
        if self.pool.key.pod != self.route.pod.name || self.pool.key.endpoint != *endpoint {
            self.pool = self.proxy.pool_at(&self.route, &self.auth.role, endpoint);
            self.pool
                .remember_auth(self.auth.client_key, &self.auth.role.verifier);
        }
        let checkout = match self.pool.checkout(&settings.limits).await {
            // A replica that fails (down before the monitor noticed, or a tenant too new to
            // have replayed there) is not the client's problem: this checkout uses the primary.
            Err(CheckoutError::Server(e)) if self.pool.key.endpoint != self.route.pod.primary => {
                tracing::debug!(tenant = %self.route.name, "replica unusable, using the primary: {e}");
                self.pool = self.proxy.pool_for(&self.route, &self.auth.role);
                self.pool
                    .remember_auth(self.auth.client_key, &self.auth.role.verifier);
                self.pool.checkout(&settings.limits).await
            }
            other => other,
        };
        let mut co = checkout.map_err(|e| match e {
            CheckoutError::Timeout { size, waited } => RouterError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "podrouter: no server connection for tenant \"{}\" within {waited:?}: all {size} are busy",
                    self.route.name
                ),
            )
            .with_hint("Retry later, or raise pool.size for this tenant."),
            CheckoutError::PodFull { limit } => RouterError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "podrouter: the pod of tenant \"{}\" is at its limit of {limit} server connections",
                    self.route.name
                ),
            )
            .with_hint("Retry later; operators can raise pool.max_pod_connections (below the pod's max_connections) or move tenants off this pod."),
            CheckoutError::Server(e) => {
                tracing::warn!(tenant = %self.route.name, pod = %self.route.pod.name, "server connection failed: {e}");
                super::server::client_error(&self.route.name, &e)
            }
        })?;
        if co.conn.synced_for != Some(self.params_sig) {
            if let Err(e) = co
                .conn
                .sync_params(&self.auth.params, settings.limits.connect_timeout)
                .await
            {
                return Err(match e {
                    super::server::ServerError::Postgres(pg) => RouterError::fatal(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "podrouter: cannot apply your session settings: {}",
                            pg.message
                        ),
                    ),
                    other => super::server::client_error(&self.route.name, &other),
                });
            }
            co.conn.synced_for = Some(self.params_sig);
        }
        tracing::trace!(
            client = self.client_id,
            backend = co.conn.backend_pid,
            "attach"
        );
        self.slot.attach(BackendTarget {
            addr: co.conn.addr,
            pid: co.conn.backend_pid,
            secret: co.conn.backend_secret,
        });
        Ok(co)
    }

    /// `now`: the clock at the ReadyForQuery that made the server clean, if just read.
    fn release(&mut self, co: Checkout, now: Option<std::time::Instant>) {
        tracing::trace!(
            client = self.client_id,
            backend = co.conn.backend_pid,
            "release"
        );
        self.slot.detach();
        self.pool.release(co, now);
        self.pass = None;
    }

    /// Sends the rest of the startup (AuthenticationOk, parameters, key, ReadyForQuery) and
    /// relays until the session ends.
    pub async fn run(mut self, key: (i32, i32), shutdown: CancellationToken) {
        let first = match self.attach().await {
            Ok(co) => co,
            Err(e) => return self.fail(e).await,
        };
        let mut out = BytesMut::new();
        backend::authentication_sasl_final(&mut out, self.auth.server_final.as_bytes());
        backend::authentication_ok(&mut out);
        for (name, value) in &first.conn.params {
            backend::parameter_status(&mut out, name, value);
        }
        backend::backend_key_data(&mut out, key.0, key.1);
        backend::ready_for_query(&mut out, b'I');
        if self.client.write_all(&out).await.is_err() {
            return self.finish_server(first).await;
        }
        let mut server = match self.mode() {
            PoolMode::Session => Some(first),
            PoolMode::Transaction => {
                self.release(first, None);
                None
            }
        };
        loop {
            let co = match server.take() {
                Some(co) => co,
                None => match self.idle(&shutdown).await {
                    Idle::Work => match self.attach().await {
                        Ok(co) => {
                            self.meter.request_from(co.since());
                            co
                        }
                        Err(e) => return self.fail(e).await,
                    },
                    Idle::End(Some(e)) => return self.fail(e).await,
                    Idle::End(None) => return,
                },
            };
            let (outcome, co) = self.relay(co, &shutdown).await;
            match outcome {
                Attached::Released => {
                    let at = self.meter.take_ready_at();
                    self.release(co, at);
                }
                Attached::ClientGone => return self.finish_server(co).await,
                Attached::Pausing => match self.carry_over(co).await {
                    Ok(next) => server = Some(next),
                    Err(e) => return self.fail(e).await,
                },
                Attached::Shutdown => {
                    self.finish_server(co).await;
                    return self.fail(shutting_down()).await;
                }
                Attached::ServerGone => {
                    self.slot.detach();
                    drop(co);
                    let _ = self.flush_to_client().await;
                    let e = RouterError::fatal(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "podrouter: lost the server connection of tenant \"{}\"",
                            self.route.name
                        ),
                    )
                    .with_hint("The pod closed the connection or went down; reconnect and retry.");
                    return self.fail(e).await;
                }
                Attached::ClientBroke(e) => {
                    self.finish_server(co).await;
                    return self.fail(e).await;
                }
            }
        }
    }

    /// Session mode, at a transaction boundary while the tenant pauses: reads what the
    /// server session holds, gives it up (so the pause can drain), waits at the gate, and
    /// continues on a new server session wherever the tenant is once the pause ends, with
    /// the session's `SET` parameters and prepared statements (SQL and protocol level)
    /// replayed there. A session holding state that cannot follow (temporary tables,
    /// advisory locks, LISTEN, open cursors) is ended with 57P01 instead.
    async fn carry_over(&mut self, mut co: Checkout) -> Result<Checkout, RouterError> {
        let timeout = self.proxy.settings().limits.connect_timeout;
        let reason = self.gate.reason();
        let state = match co.conn.query_values(CARRY_STATE, timeout).await {
            Ok(v) => v.into_iter().next().flatten().unwrap_or_default(),
            Err(e) => {
                self.slot.detach();
                drop(co); // the connection is unusable after a failed query of the router's own
                return Err(cannot_follow(
                    &self.route.name,
                    reason,
                    &format!("its server session could not be read ({e})"),
                ));
            }
        };
        let carried = Carried::parse(&state);
        self.finish_server(co).await;
        self.pass = None;
        let carried = carried.map_err(|what| cannot_follow(&self.route.name, reason, &what))?;
        let mut next = self.attach().await?;
        let sql = carried.replay();
        if !sql.is_empty() {
            if let Err(e) = next.conn.simple_query(&sql, timeout).await {
                self.slot.detach();
                drop(next); // half restored: never pooled
                return Err(cannot_follow(
                    &self.route.name,
                    reason,
                    &format!("its settings or prepared statements could not be restored ({e})"),
                ));
            }
            tracing::debug!(
                client = self.client_id,
                settings = carried.settings.len(),
                prepared = carried.prepared.len(),
                "session carried over"
            );
        }
        Ok(next)
    }

    /// The server is clean when no request is outstanding and no transaction is open.
    fn server_clean(&self) -> bool {
        self.replies.is_empty()
            && self.status == b'I'
            && self.cscan.remaining == 0
            && self.sscan.remaining == 0
            && self.cout.is_empty()
    }

    /// Gives the server back when the client leaves: clean ones are reset (session mode) and
    /// pooled; anything mid-request is cancelled and closed.
    async fn finish_server(&mut self, mut co: Checkout) {
        self.slot.detach();
        if !self.server_clean() {
            // A client that leaves right after its last request (a statement Close and Sync
            // still in flight, say) leaves a server that is idle a moment later: wait a
            // little for the replies rather than throw the connection away.
            let settled = tokio::time::timeout(DRAIN_ON_EXIT, self.drain(&mut co)).await;
            if !matches!(settled, Ok(Ok(()))) || !self.server_clean() {
                tracing::trace!(client = self.client_id, ?settled, replies = ?self.replies, status = %(self.status as char), "server closed: not idle when the client left");
                if !self.replies.is_empty() {
                    send_cancel(BackendTarget {
                        addr: co.conn.addr,
                        pid: co.conn.backend_pid,
                        secret: co.conn.backend_secret,
                    })
                    .await;
                }
                return; // dropping `co` closes the connection; the backend rolls back
            }
        }
        if self.mode() == PoolMode::Session {
            let s = self.proxy.settings();
            if co
                .conn
                .simple_query(&s.reset_query, s.limits.connect_timeout)
                .await
                .is_err()
            {
                tracing::trace!(client = self.client_id, "server closed: reset query failed");
                return;
            }
            co.conn.synced_for = None;
            co.conn.prepared.clear();
        }
        self.pool.release(co, None);
    }

    /// After the client left: sends what it had fully queued and reads the server's replies
    /// (discarding them) until nothing is outstanding.
    async fn drain(&mut self, co: &mut Checkout) -> std::io::Result<()> {
        if self.cscan.remaining > 0 {
            return Err(std::io::ErrorKind::InvalidData.into()); // half a message was sent
        }
        co.conn.stream.write_all(&self.cout).await?;
        self.cout.clear();
        loop {
            self.scan_server(co)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
            self.sout.clear();
            if self.server_clean() {
                return Ok(());
            }
            reserve(&mut self.sin);
            if co.conn.stream.read_buf(&mut self.sin).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn fail(mut self, e: RouterError) {
        tracing::debug!(client = self.client_id, tenant = %self.route.name, code = %e.code, "session ends: {}", e.message);
        self.pool.stats.error(e.code.as_bytes());
        let mut out = BytesMut::new();
        e.encode(&mut out);
        let _ = self.client.write_all(&out).await;
        let _ = self.client.shutdown().await;
    }

    /// Writes what is owed to the client if its socket takes it at once (it nearly always
    /// does): one write without a round through a `select!`. What is left, the caller's
    /// `select!` writes, polled there with this task's waker, so no wake-up is lost.
    fn write_client_now(&mut self) -> std::io::Result<()> {
        if !self.sout.is_empty() {
            if let Some(n) = self.client.write_buf(&mut self.sout).now_or_never() {
                self.meter.bytes_out += n? as u64;
            }
        }
        Ok(())
    }

    async fn flush_to_client(&mut self) -> std::io::Result<()> {
        while !self.sout.is_empty() {
            self.client.write_buf(&mut self.sout).await?;
        }
        Ok(())
    }

    /// The client message at the head of `cin` must be read whole before any of it goes to
    /// the server (a Parse is renamed by a hash of all of it), and is not yet: reading on is
    /// the only way forward, however long it is (up to the protocol's 1 GiB, as Postgres).
    fn waits_for_whole_message(&self) -> bool {
        self.cscan.remaining == 0
            && framing::peek_header(&self.cin)
                .ok()
                .flatten()
                .is_some_and(|h| self.cin.len() < h.wire_len)
    }

    /// Client → server: moves whole or partial messages from `cin` to `cout`, counting
    /// requests, dropping Terminate, and in transaction mode renaming prepared statements.
    fn scan_client(&mut self, co: &mut Checkout) -> Result<(), FrameError> {
        let transaction = self.mode() == PoolMode::Transaction;
        loop {
            if self.cscan.remaining > 0 {
                let n = self.cscan.remaining.min(self.cin.len());
                if n == 0 {
                    return Ok(());
                }
                forward(&mut self.cin, &mut self.cout, n);
                self.cscan.remaining -= n;
                continue;
            }
            if self.terminate {
                self.cin.clear();
                return Ok(());
            }
            let Some(h) = framing::peek_header(&self.cin)? else {
                return Ok(());
            };
            if !framing::is_frontend_tag(h.tag) || h.tag == b'p' {
                return Err(FrameError::UnknownFrontendTag(h.tag));
            }
            if h.tag == b'X' {
                self.terminate = true;
                continue;
            }
            let pass = if transaction {
                match prepared::rewrite(
                    h,
                    &mut self.cin,
                    &mut self.cout,
                    &mut self.stmts,
                    &mut co.conn.prepared,
                    &mut self.replies,
                    self.status,
                )? {
                    Step::NeedMore => return Ok(()),
                    Step::Done { pass } => pass,
                }
            } else {
                prepared::track(h, &mut self.replies);
                h.wire_len
            };
            let n = pass.min(self.cin.len());
            forward(&mut self.cin, &mut self.cout, n);
            self.cscan.remaining = pass - n;
            self.meter.request();
            if transaction && self.sscan.remaining == 0 {
                self.replies.pump(&mut self.sout);
            }
        }
    }

    /// Server → client: moves messages from `sin` to `sout`, reading ReadyForQuery and
    /// ParameterStatus on the way. Returns true at a point where the server may be released
    /// (transaction mode).
    fn scan_server(&mut self, co: &mut Checkout) -> Result<bool, FrameError> {
        // Messages are scanned in place and moved to `sout` in one piece at the end (or before
        // the router writes or drops anything itself): one split per read, not per message.
        let mut fwd = 0;
        let r = self.scan_server_at(co, &mut fwd);
        forward(&mut self.sin, &mut self.sout, fwd);
        r
    }

    /// [`Session::scan_server`] from `sin[*fwd..]`; `*fwd` bytes are scanned and owed to
    /// the client.
    fn scan_server_at(&mut self, co: &mut Checkout, fwd: &mut usize) -> Result<bool, FrameError> {
        loop {
            let rest = self.sin.len() - *fwd;
            if self.sscan.remaining > 0 {
                let n = self.sscan.remaining.min(rest);
                if n == 0 {
                    return Ok(false);
                }
                *fwd += n;
                self.sscan.remaining -= n;
                continue;
            }
            // The router's own replies that are due go out between whole messages.
            if self.replies.due() {
                forward(&mut self.sin, &mut self.sout, std::mem::take(fwd));
                self.replies.pump(&mut self.sout);
            }
            let at = *fwd;
            let Some(h) = framing::peek_header(&self.sin[at..])? else {
                // A query the router answered itself (DEALLOCATE) may leave the server clean
                // with no ReadyForQuery of its own to come.
                let answered = self.replies.take_ready_sent();
                return Ok(answered && self.mode() == PoolMode::Transaction && self.server_clean());
            };
            // Both modes track replies (session mode to know when the server is idle).
            let whole = self.replies.needs_whole(h.tag) || matches!(h.tag, b'Z' | b'S' | b'E');
            if whole && rest < h.wire_len {
                return Ok(false);
            }
            if !self.replies.on_server(
                h.tag,
                &mut co.conn.prepared,
                &self.pool.known,
                &mut self.stmts,
            ) {
                // The reply to a message the router injected.
                forward(&mut self.sin, &mut self.sout, std::mem::take(fwd));
                let _ = self.sin.split_to(h.wire_len);
                continue;
            }
            let body = &self.sin[at + 5..at + h.wire_len.min(rest)];
            match h.tag {
                b'E' => {
                    crate::metrics::count_error(&self.pool.stats, body);
                    *fwd += h.wire_len;
                }
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(b'I');
                    let pending = !self.replies.is_empty();
                    self.meter.ready(&self.pool.stats, self.status, pending);
                    *fwd += h.wire_len;
                    if self.mode() == PoolMode::Transaction && self.server_clean() {
                        return Ok(true);
                    }
                }
                b'S' => {
                    if let Some((name, value)) = parameter_status(body) {
                        co.conn.set_param(&name, &value);
                        // Changed behind the sync's back: compare fully at the next checkout.
                        co.conn.synced_for = None;
                        self.remember_param(&name, &value);
                    }
                    *fwd += h.wire_len;
                }
                _ => {
                    let n = h.wire_len.min(rest);
                    *fwd += n;
                    self.sscan.remaining = h.wire_len - n;
                }
            }
        }
    }

    /// A parameter the server reported while this client held it (e.g. after SET) is the
    /// client's from now on, and follows it to other server connections.
    fn remember_param(&mut self, name: &str, value: &str) {
        if !self
            .auth
            .params
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
            && !TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name))
        {
            return;
        }
        match self
            .auth
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(slot) if slot.1 == value => return,
            Some(slot) => slot.1 = value.to_owned(),
            None => self.auth.params.push((name.to_owned(), value.to_owned())),
        }
        self.params_sig = super::server::params_signature(&self.auth.params);
    }

    /// Relays with a server attached until one of the [`Attached`] outcomes.
    async fn relay(
        &mut self,
        mut co: Checkout,
        shutdown: &CancellationToken,
    ) -> (Attached, Checkout) {
        let outcome = loop {
            if let Err(e) = self.scan_client(&mut co) {
                break Attached::ClientBroke(RouterError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("podrouter: protocol violation: {e}"),
                ));
            }
            if self.terminate && self.cout.is_empty() {
                break Attached::ClientGone;
            }
            match self.scan_server(&mut co) {
                Ok(true) => break Attached::Released,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant = %self.route.name, "pod sent a malformed message: {e}");
                    break Attached::ServerGone;
                }
            }
            // Sockets nearly always take a request or a reply at once: write without a trip
            // through the select below (a loop round per message saved; what does not fit is
            // left to it, polled again with this task's waker).
            if !self.cout.is_empty() {
                if let Some(Err(_)) = co.conn.stream.write_buf(&mut self.cout).now_or_never() {
                    break Attached::ServerGone;
                }
            }
            if self.write_client_now().is_err() {
                break Attached::ClientGone;
            }
            let read_client = !self.terminate
                && self.cout.len() < HIGH_WATER
                && (self.cin.len() < HIGH_WATER || self.waits_for_whole_message());
            let read_server = self.sout.len() < HIGH_WATER;
            let idle_point = self.server_clean() && self.sout.is_empty();
            if idle_point {
                self.meter.flush(&self.pool.stats);
            }
            // Session mode holds its server between transactions; a live move of the tenant
            // must not wait for the session to end, so at a clean point it ends it.
            let watch_pause = idle_point && self.mode == PoolMode::Session;
            let pausing = self.gate.pausing();
            if watch_pause && self.gate.is_paused() {
                break Attached::Pausing;
            }
            reserve(&mut self.cin);
            reserve(&mut self.sin);
            let (mut cr, mut cw) = self.client.split();
            let (mut sr, mut sw) = co.conn.stream.split();
            tokio::select! {
                biased;
                r = sw.write_buf(&mut self.cout), if !self.cout.is_empty() => {
                    if r.is_err() { break Attached::ServerGone; }
                }
                r = cw.write_buf(&mut self.sout), if !self.sout.is_empty() => {
                    match r { Ok(n) => self.meter.bytes_out += n as u64, Err(_) => break Attached::ClientGone }
                }
                r = sr.read_buf(&mut self.sin), if read_server => {
                    if !matches!(r, Ok(n) if n > 0) { break Attached::ServerGone; }
                }
                r = cr.read_buf(&mut self.cin), if read_client => {
                    match r { Ok(n) if n > 0 => self.meter.bytes_in += n as u64, _ => break Attached::ClientGone }
                }
                _ = shutdown.cancelled(), if idle_point => break Attached::Shutdown,
                _ = pausing, if watch_pause => break Attached::Pausing,
            }
        };
        (outcome, co)
    }

    /// [`Session::idle`] with the input it has: answers what needs no server, refuses what
    /// transaction pooling cannot do, and says whether to go to work or end; None: read on.
    fn idle_step(&mut self) -> Option<Idle> {
        loop {
            if self.skip_to_sync {
                match self.skip_refused() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(end) => return Some(end),
                }
            }
            if let Err(e) = prepared::answer_without_server(
                &mut self.cin,
                &mut self.stmts,
                &self.pool.known,
                &mut self.sout,
            ) {
                return Some(Idle::End(Some(violation(e))));
            }
            let h = match framing::peek_header(&self.cin) {
                Err(e) => return Some(Idle::End(Some(violation(e)))),
                Ok(None) => return None,
                Ok(Some(h)) => h,
            };
            if !framing::is_frontend_tag(h.tag) || h.tag == b'p' {
                return Some(Idle::End(Some(violation(FrameError::UnknownFrontendTag(
                    h.tag,
                )))));
            }
            if h.tag == b'X' {
                return Some(Idle::End(None));
            }
            // The query that starts a transaction: a simple query, or the Parse that begins an
            // extended-protocol batch (as psycopg sends a query with parameters, and JDBC and
            // tokio-postgres send every query).
            if !matches!(h.tag, b'Q' | b'P') || self.cin.len() < h.wire_len {
                return Some(Idle::Work);
            }
            let body = &self.cin[5..h.wire_len];
            let query = if h.tag == b'Q' {
                Some(body)
            } else {
                parse_query(body)
            };
            let Some(feature) = query.and_then(session_only) else {
                return Some(Idle::Work);
            };
            // Refused before any server is involved; the client stays usable.
            session_only_error(feature, &self.route.name).encode(&mut self.sout);
            if h.tag == b'Q' {
                self.cin.advance(h.wire_len);
                backend::ready_for_query(&mut self.sout, b'I');
            } else {
                // As a server that refused a Parse: nothing more until the client's Sync.
                self.skip_to_sync = true;
            }
        }
    }

    /// Drops the client's messages up to its Sync, which is answered with ReadyForQuery:
    /// Ok(true) once it was, Ok(false) while more is to come. A message is dropped as it
    /// arrives, not held whole.
    fn skip_refused(&mut self) -> Result<bool, Idle> {
        loop {
            if self.skip_bytes > 0 {
                let n = self.skip_bytes.min(self.cin.len());
                self.cin.advance(n);
                self.skip_bytes -= n;
                if self.skip_bytes > 0 {
                    return Ok(false);
                }
            }
            match framing::peek_header(&self.cin) {
                Err(e) => return Err(Idle::End(Some(violation(e)))),
                Ok(None) => return Ok(false),
                Ok(Some(h)) if h.tag == b'X' => return Err(Idle::End(None)),
                Ok(Some(h)) => {
                    self.skip_bytes = h.wire_len;
                    if h.tag == b'S' {
                        self.cin.advance(h.wire_len);
                        self.skip_bytes = 0;
                        self.skip_to_sync = false;
                        backend::ready_for_query(&mut self.sout, b'I');
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Transaction mode between transactions: no server held. Flushes what is owed to the
    /// client and waits for the start of its next message.
    async fn idle(&mut self, shutdown: &CancellationToken) -> Idle {
        loop {
            if let Some(end) = self.idle_step() {
                return end;
            }
            // An idle client usually sends one small message next: keep its buffer small,
            // since thousands of idle clients each hold one.
            if self.cin.capacity() - self.cin.len() < 64 {
                self.cin.reserve(IDLE_READ_CHUNK);
            }
            if self.write_client_now().is_err() {
                return Idle::End(None);
            }
            if self.sout.is_empty() {
                self.meter.flush(&self.pool.stats);
            }
            let (mut cr, mut cw) = self.client.split();
            tokio::select! {
                biased;
                r = cw.write_buf(&mut self.sout), if !self.sout.is_empty() => {
                    match r { Ok(n) => self.meter.bytes_out += n as u64, Err(_) => return Idle::End(None) }
                }
                r = cr.read_buf(&mut self.cin) => {
                    match r { Ok(n) if n > 0 => self.meter.bytes_in += n as u64, _ => return Idle::End(None) }
                }
                _ = shutdown.cancelled(), if self.sout.is_empty() => return Idle::End(Some(shutting_down())),
            }
        }
    }
}

enum Idle {
    Work,
    End(Option<RouterError>),
}

/// Reported parameters that follow a client across server connections once it sets them.
const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Statements that need a server connection for the rest of the session, which transaction
/// pooling cannot give: they are refused with a clear error rather than silently breaking
/// (a LISTEN that never hears, a lock held by whoever gets the connection next).
fn session_only(query: &[u8]) -> Option<&'static str> {
    use super::sqltext::{contains_ci, starts_with_ci};
    let start = query
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(query.len());
    let q = &query[start..];
    let starts = |word: &[u8]| {
        starts_with_ci(q, word) && q.get(word.len()).is_some_and(u8::is_ascii_whitespace)
    };
    if starts(b"listen") {
        Some("LISTEN")
    } else if contains_ci(q, b"advisory_lock", 2)
        && (contains_ci(q, b"pg_advisory_lock(", 5)
            || contains_ci(q, b"pg_try_advisory_lock(", 9)
            || contains_ci(q, b"pg_advisory_lock_shared(", 5))
    {
        Some("a session-level advisory lock")
    } else if starts(b"declare") && contains_ci(q, b" with hold", 1) {
        Some("a WITH HOLD cursor")
    } else {
        None
    }
}

/// The query text of a Parse message's body (after the tag and length).
fn parse_query(body: &[u8]) -> Option<&[u8]> {
    let rest = &body[memchr::memchr(0, body)? + 1..];
    Some(&rest[..memchr::memchr(0, rest)?])
}

fn session_only_error(feature: &str, tenant: &str) -> RouterError {
    RouterError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("podrouter: {feature} needs a server connection for the whole session, which transaction pooling does not keep"),
    )
    .with_hint(format!(
        "Use session pooling for this tenant: `podrouter tenants set-mode {tenant} session`, or a transaction-scoped alternative (pg_advisory_xact_lock)."
    ))
}

/// One query, one text value: what of a server session a session-mode client depends on.
const CARRY_STATE: &str = "SELECT json_build_object(\
 'pinned', array_remove(ARRAY[\
   CASE WHEN EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = pg_my_temp_schema()) THEN 'temporary tables' END,\
   CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory') THEN 'advisory locks' END,\
   CASE WHEN EXISTS (SELECT 1 FROM pg_listening_channels()) THEN 'LISTEN registrations' END,\
   CASE WHEN EXISTS (SELECT 1 FROM pg_cursors) THEN 'open cursors' END], NULL),\
 'settings', (SELECT coalesce(json_agg(json_build_array(name, setting)), '[]') FROM pg_settings WHERE source = 'session'),\
 'prepared', (SELECT coalesce(json_agg(json_build_array(name, statement, parameter_types::text[], from_sql)), '[]') FROM pg_prepared_statements)\
)::text";

/// A session-mode client's server-side session state that can be given to a new server
/// session.
#[derive(Debug, Default, PartialEq)]
struct Carried {
    /// Parameters set in the session (`SET`), as `pg_settings` shows them (base units).
    settings: Vec<(String, String)>,
    /// `PREPARE` commands recreating the named prepared statements.
    prepared: Vec<String>,
}

impl Carried {
    /// From [`CARRY_STATE`]'s value; Err names what cannot follow the client.
    fn parse(state: &str) -> Result<Carried, String> {
        #[derive(serde::Deserialize)]
        struct State {
            pinned: Vec<String>,
            settings: Vec<(String, String)>,
            prepared: Vec<(String, String, Vec<String>, bool)>,
        }
        let st: State = serde_json::from_str(state)
            .map_err(|e| format!("a session state the router could not read ({e})"))?;
        if !st.pinned.is_empty() {
            return Err(st.pinned.join(", "));
        }
        let mut prepared = Vec::with_capacity(st.prepared.len());
        for (name, statement, types, from_sql) in st.prepared {
            let body = statement.trim().trim_end_matches(';').trim_end();
            if from_sql {
                // The client's own PREPARE command, replayed as written. Postgres keeps the
                // whole query string it came in, which may hold other statements too.
                let Some(cmd) = prepare_command(body, &name) else {
                    return Err(format!(
                        "prepared statement \"{name}\" (its PREPARE command could not be found in its text)"
                    ));
                };
                prepared.push(cmd.to_owned());
            } else if types.is_empty() {
                prepared.push(format!(
                    "PREPARE {} AS {body}",
                    super::server::quote_ident(&name)
                ));
            } else {
                prepared.push(format!(
                    "PREPARE {} ({}) AS {body}",
                    super::server::quote_ident(&name),
                    types.join(", ")
                ));
            }
        }
        Ok(Carried {
            settings: st.settings,
            prepared,
        })
    }

    /// One simple-query string restoring the state on a fresh server session.
    fn replay(&self) -> String {
        let mut sql = String::new();
        if !self.settings.is_empty() {
            // set_config parses values as the configuration file does (lists, units).
            let calls: Vec<String> = self
                .settings
                .iter()
                .map(|(n, v)| {
                    format!(
                        "set_config({}, {}, false)",
                        super::server::quote_literal(n),
                        super::server::quote_literal(v)
                    )
                })
                .collect();
            sql.push_str(&format!("SELECT {};", calls.join(", ")));
        }
        for p in &self.prepared {
            sql.push_str(p);
            sql.push(';');
        }
        sql
    }
}

/// The `PREPARE name ...` command among the statements of `text`, for the prepared
/// statement `name` (as Postgres stores it: folded to lower case unless quoted).
fn prepare_command<'t>(text: &'t str, name: &str) -> Option<&'t str> {
    let mut found = super::sqltext::split_statements(text)
        .into_iter()
        .filter(|stmt| {
            let Some(rest) = stmt
                .get(..8)
                .filter(|p| p.eq_ignore_ascii_case("prepare "))
                .map(|_| stmt[8..].trim_start())
            else {
                return false;
            };
            let written = if let Some(q) = rest.strip_prefix('"') {
                q.split('"').next().map(str::to_owned)
            } else {
                rest.split(|c: char| c.is_whitespace() || c == '(')
                    .next()
                    .map(str::to_lowercase)
            };
            written.as_deref() == Some(name)
        });
    let first = found.next()?;
    // Prepared twice in one string (a DEALLOCATE between): which one stands is unclear.
    found.next().is_none().then_some(first)
}

fn cannot_follow(tenant: &str, reason: &str, what: &str) -> RouterError {
    RouterError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        format!(
            "podrouter: tenant \"{tenant}\" is paused by {reason} (moving to another pod or held) and this session-mode connection holds {what}, which cannot follow it; the session ends between transactions"
        ),
    )
    .with_hint("Reconnect: the new connection reaches the tenant wherever it is. Sessions without temporary tables, advisory locks, LISTEN or open cursors are carried over by themselves.")
}

fn paused_error(tenant: &str, held: Held) -> RouterError {
    let (message, hint) = match held {
        Held::QueueFull { limit, reason } => (
            format!("podrouter: tenant \"{tenant}\" is paused by {reason} and {limit} clients already wait"),
            "Retry in a moment; operators can raise moves.max_held_clients.".to_owned(),
        ),
        Held::TimedOut { waited, reason } => (
            format!("podrouter: tenant \"{tenant}\" is paused by {reason} and did not resume within {waited:?}"),
            format!("Retry later; an operator resumes it with POST /v1/tenants/{tenant}/resume."),
        ),
    };
    RouterError::fatal(sqlstate::TOO_MANY_CONNECTIONS, message).with_hint(hint)
}

fn violation(e: FrameError) -> RouterError {
    RouterError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("podrouter: protocol violation: {e}"),
    )
}

fn shutting_down() -> RouterError {
    RouterError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "podrouter: terminating connection because the router is shutting down",
    )
    .with_hint("Reconnect; another router instance or the restarted one will serve you.")
}

fn forward(from: &mut BytesMut, to: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    let chunk = from.split_to(n);
    if to.is_empty() {
        *to = chunk;
    } else {
        to.unsplit(chunk);
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

fn parameter_status(mut body: &[u8]) -> Option<(String, String)> {
    let name = framing::take_cstr(&mut body).ok()?.to_owned();
    let value = framing::take_cstr(&mut body).ok()?.to_owned();
    Some((name, value))
}

/// Pool key for a tenant's current route and a role.
pub fn pool_key(route: &crate::routing::TenantRoute, role: &str) -> PoolKey {
    pool_key_at(route, role, &route.pod.primary)
}

/// Pool key for a tenant and role on one server of its pod (the primary or a replica).
pub fn pool_key_at(
    route: &crate::routing::TenantRoute,
    role: &str,
    endpoint: &crate::config::PgEndpoint,
) -> PoolKey {
    PoolKey {
        tenant: route.name.clone(),
        role: role.to_owned(),
        pod: route.pod.name.clone(),
        endpoint: endpoint.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_query, session_only, Carried};

    #[test]
    fn the_query_of_a_parse() {
        let q = |b: &[u8]| parse_query(b).map(|q| String::from_utf8(q.to_vec()).unwrap());
        assert_eq!(q(b"s0\0LISTEN x\0\0\0").as_deref(), Some("LISTEN x"));
        assert_eq!(
            q(b"\0select $1\0\0\x01\0\0\0\x17").as_deref(),
            Some("select $1")
        );
        assert_eq!(q(b"s0\0no end"), None);
        assert_eq!(q(b"no name end"), None);
    }

    #[test]
    fn carried_session_state() {
        let st = r#"{"pinned": [], "settings": [["search_path", "app, public"], ["work_mem", "8192"]],
            "prepared": [["q1", "select * from t where id = $1 and name = $2", ["integer", "character varying"], false],
                         ["Q2", "select 1", [], false],
                         ["q3", "PREPARE q3 (int) AS select $1 + 1;", ["integer"], true]]}"#;
        let c = Carried::parse(st).unwrap();
        assert_eq!(
            c.replay(),
            "SELECT set_config('search_path', 'app, public', false), set_config('work_mem', '8192', false);\
             PREPARE \"q1\" (integer, character varying) AS select * from t where id = $1 and name = $2;\
             PREPARE \"Q2\" AS select 1;\
             PREPARE q3 (int) AS select $1 + 1;"
        );
        let pinned = r#"{"pinned": ["temporary tables", "LISTEN registrations"], "settings": [], "prepared": []}"#;
        assert_eq!(
            Carried::parse(pinned).unwrap_err(),
            "temporary tables, LISTEN registrations"
        );
        // A PREPARE sent with other statements in one query string.
        let multi = r#"{"pinned": [], "settings": [], "prepared": [["byid", "set x.y = 'a;b'; PREPARE ByID (int) AS select $1 -- ;\n + 1; select 2", ["integer"], true]]}"#;
        assert_eq!(
            Carried::parse(multi).unwrap().prepared,
            ["PREPARE ByID (int) AS select $1 -- ;\n + 1"]
        );
        let lost = r#"{"pinned": [], "settings": [], "prepared": [["a", "select 1; select 2", [], true]]}"#;
        assert!(Carried::parse(lost).unwrap_err().contains("\"a\""));

        assert_eq!(
            Carried::parse(r#"{"pinned": [], "settings": [], "prepared": []}"#)
                .unwrap()
                .replay(),
            ""
        );
    }

    #[test]
    fn session_only_statements() {
        let check =
            |q: &str, want: Option<&str>| assert_eq!(session_only(q.as_bytes()), want, "{q}");
        check("LISTEN jobs", Some("LISTEN"));
        check("  listen jobs;", Some("LISTEN"));
        check(
            "select pg_advisory_lock(1)",
            Some("a session-level advisory lock"),
        );
        check(
            "SELECT pg_try_advisory_lock(42)",
            Some("a session-level advisory lock"),
        );
        check("select pg_advisory_xact_lock(1)", None);
        check(
            "DECLARE c CURSOR WITH HOLD FOR select 1",
            Some("a WITH HOLD cursor"),
        );
        check("declare c cursor for select 1", None);
        check("select 'listen'", None);
        check("NOTIFY jobs", None);
        check("LISTEN\tjobs", Some("LISTEN"));
        check("listener_count()", None);
    }
}
