//! Named prepared statements in transaction mode, where a client's statements must exist on
//! whichever server connection it lands on.
//!
//! * Server-side names are content-addressed: `pr_` + 128 bits of SHA-256 over the Parse
//!   body (query text and parameter types). Every client that prepares the same query shares
//!   one server statement per server connection, and equal client names from different
//!   clients never collide.
//! * Each client keeps its own name → statement map ([`ClientStatements`]). Each server
//!   connection remembers which statements it holds ([`ServerStatements`], bounded, least
//!   recently used evicted with a Close).
//! * Rewriting client → server: Parse is renamed (or answered by the router when the server
//!   already holds the statement); Bind and Describe are renamed, with a Parse injected first
//!   when the statement is missing on this server; Close of a statement is answered by the
//!   router (server statements are shared). A `DEALLOCATE name` of the client's own
//!   statement is answered by the router when it comes as a simple query with nothing
//!   pending; as a prepared statement (psycopg 3 evicts from its cache so) or inside a
//!   pipeline, it is rewritten to drop a placeholder statement instead (see [`Effect`]).
//! * Server → client: an ordered queue of expected replies ([`Replies`]) tells the relay
//!   which reply belongs to which message, so replies to injected messages are dropped and
//!   the router's own replies are inserted exactly where the server's would have been.
//!   After an ErrorResponse the server skips to Sync, and so does the queue.

use super::sqltext::{deallocate, drops_statements_exactly, mentions_dropping, Deallocate};
use crate::protocol::framing::{take_cstr, FrameError, Header};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Statements a pool remembers as known to parse before it starts over.
pub const KNOWN_LIMIT: usize = 10_000;

/// Statements a server connection keeps before evicting the least recently used.
pub const SERVER_CACHE_SIZE: usize = 512;

/// A simple query up to this long is read whole before it goes to the server, so the router
/// can tell whether it drops prepared statements; a longer one is assumed to.
const WHOLE_QUERY_LIMIT: usize = 64 * 1024;

type Key = [u8; 16];

/// The statement a client's `DEALLOCATE name` of its own statement drops instead, when the
/// router cannot answer it alone: see [`Effect::Deallocates`].
const PLACEHOLDER: &str = "pr_dealloc";
const PLACEHOLDER_DEALLOCATE: &[u8] = b"DEALLOCATE pr_dealloc";

/// What running a statement does to prepared statements, when anything.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    /// It may drop statements the server holds: DISCARD ALL, DEALLOCATE ALL, DEALLOCATE of a
    /// name the client did not prepare through the protocol (a SQL PREPARE of its own).
    Drops,
    /// `DEALLOCATE name` of the client's own statement `name`. The server knows that statement
    /// as `pr_...`, shared with other clients, so the text sent becomes
    /// `DEALLOCATE pr_dealloc`, and the router prepares that placeholder right before each
    /// Execute. The server then answers every message of it as it would have answered the
    /// client's (an aborted transaction fails it alike), and the client's name is forgotten
    /// when the Execute succeeds.
    Deallocates(String),
}

/// The effect of running `query` for a client whose statements are `client`. Nearly always
/// `None`, decided by one pass over the query's d's.
fn effect_of(query: &[u8], client: &ClientStatements) -> Option<Effect> {
    if !mentions_dropping(query) {
        return None;
    }
    if let Some(Deallocate::Name(name)) = deallocate(query) {
        if client.by_name.contains_key(&name) {
            return Some(Effect::Deallocates(name));
        }
    }
    drops_statements_exactly(query).then_some(Effect::Drops)
}

/// The query text of a Parse body (after the statement name).
fn query_of(body: &[u8]) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or_default()
}

/// A Parse body (after the statement name) with its query replaced by the placeholder's
/// DEALLOCATE; the parameter types stay.
fn with_placeholder_deallocate(body: &[u8]) -> Bytes {
    let nul = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let mut b = BytesMut::with_capacity(PLACEHOLDER_DEALLOCATE.len() + body.len() - nul);
    b.put_slice(PLACEHOLDER_DEALLOCATE);
    b.put_slice(&body[nul..]);
    b.freeze()
}

/// The server-side name of the statement `key`: `pr_<32 hex>`.
fn server_name(key: &Key) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("pr_{hex}")
}

/// One statement as a client prepared it.
#[derive(Debug)]
pub struct Statement {
    key: Key,
    /// The server-side name, `pr_<32 hex>`.
    name: String,
    /// The Parse body after the statement name, as the server gets it: query, parameter
    /// count and types.
    body: Bytes,
    /// What running it does to prepared statements (nearly always nothing).
    effect: Option<Effect>,
}

impl Statement {
    /// The statement that the Parse body `body` (after the name) of a client with statements
    /// `client` prepares.
    fn new(body: Bytes, client: &ClientStatements) -> Statement {
        let effect = effect_of(query_of(&body), client);
        let body = match effect {
            Some(Effect::Deallocates(_)) => with_placeholder_deallocate(&body),
            _ => body,
        };
        let digest = Sha256::digest(&body);
        let key: Key = digest[..16].try_into().expect("16 bytes");
        Statement {
            key,
            name: server_name(&key),
            effect,
            body,
        }
    }
}

/// A client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<String, Arc<Statement>>,
    /// What running the client's unnamed statement does to prepared statements.
    unnamed_effect: Option<Effect>,
    /// Portals bound to a statement with an [`Effect`], which executing them has. Nearly
    /// always empty.
    effect_portals: Vec<(String, Effect)>,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// `portal` was bound, to a statement with `effect`.
    fn bound(&mut self, portal: &str, effect: Option<Effect>) {
        self.effect_portals.retain(|(p, _)| p != portal);
        if let Some(effect) = effect {
            if self.effect_portals.len() >= 16 {
                self.effect_portals.remove(0);
            }
            self.effect_portals.push((portal.to_owned(), effect));
        }
    }

    /// The server ran the client's DEALLOCATE of `name`, which was `stmt` then: forgotten,
    /// unless the client has since prepared another statement under that name.
    fn deallocated(&mut self, (name, stmt): (String, Arc<Statement>)) {
        if self
            .by_name
            .get(&name)
            .is_some_and(|s| Arc::ptr_eq(s, &stmt))
        {
            self.by_name.remove(&name);
        }
    }

    /// Runs `query` if it is a DEALLOCATE of one statement this client has, and says how to
    /// answer it. `DEALLOCATE ALL` is left to the server: it also drops what the client made
    /// with SQL `PREPARE` in this transaction, which the router does not track.
    fn deallocate(&mut self, query: &[u8], status: u8) -> Option<Done> {
        match deallocate(query)? {
            Deallocate::All => None,
            Deallocate::Name(name) => {
                self.by_name.remove(&name)?;
                Some(Done {
                    tag: "DEALLOCATE",
                    status,
                })
            }
        }
    }
}

/// Statements prepared on one server connection.
#[derive(Default, Debug)]
pub struct ServerStatements {
    entries: HashMap<Key, u64>,
    /// Statements the server may or may not hold: it held them when a command that can drop
    /// statements ran (DISCARD ALL, DEALLOCATE, which may also have failed), or a Parse of
    /// them failed or was skipped. Preparing one again is preceded by a Close (closing a
    /// statement that does not exist is not an error).
    unsure: HashSet<Key>,
    tick: u64,
}

impl ServerStatements {
    fn has(&mut self, key: &Key) -> bool {
        self.tick += 1;
        match self.entries.get_mut(key) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: Key) {
        self.tick += 1;
        self.entries.insert(key, self.tick);
    }

    /// A Parse of `key` failed or was skipped: whether the server holds it is unknown.
    fn failed(&mut self, key: &Key) {
        if self.entries.remove(key).is_some() {
            self.unsure.insert(*key);
        }
    }

    /// A command that may drop statements went to the server.
    fn forget_all(&mut self) {
        self.unsure.extend(self.entries.drain().map(|(k, _)| k));
    }

    /// Forgets everything, knowing the server holds nothing (after the router's own
    /// DISCARD ALL succeeded).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.unsure.clear();
    }

    fn oldest(&self) -> Option<Key> {
        self.entries
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(k, _)| *k)
    }

    /// Statements the router knows the server holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Statements that some server connection of a pool has parsed successfully. A client that
/// prepares one of them between transactions is answered by the router without waiting for
/// a server connection: a client library that prepares synchronously (libpq's PQprepare,
/// as pgbench -M prepared does) would otherwise block its other connections, which may hold
/// every server connection mid-transaction, until the checkout deadline.
#[derive(Default)]
pub struct KnownStatements(parking_lot::Mutex<HashSet<Key>>);

impl KnownStatements {
    fn insert(&self, key: Key) {
        let mut set = self.0.lock();
        if set.len() >= KNOWN_LIMIT {
            set.clear(); // rare; the cost is a few statements going to a server again
        }
        set.insert(key);
    }

    fn contains(&self, key: &Key) -> bool {
        self.0.lock().contains(key)
    }
}

/// Between transactions (no server held, so the client is outside any transaction):
/// answers Parse of statements the pool knows, Close of named statements, `DEALLOCATE` of
/// the client's statements, Sync and Flush without a server. Stops at the
/// first message that needs one. Returns whether anything was answered.
pub fn answer_without_server(
    input: &mut BytesMut,
    stmts: &mut ClientStatements,
    known: &KnownStatements,
    to_client: &mut BytesMut,
) -> Result<bool, FrameError> {
    let mut answered = false;
    while let Some(h) = crate::protocol::framing::peek_header(input)? {
        if input.len() < h.wire_len {
            break;
        }
        match h.tag {
            b'P' => {
                let mut body = &input[5..h.wire_len];
                let name = take_cstr(&mut body).map_err(|_| malformed("bad Parse message"))?;
                if name.is_empty() {
                    break;
                }
                let stmt = Statement::new(Bytes::copy_from_slice(body), stmts);
                if !known.contains(&stmt.key) {
                    break;
                }
                stmts.by_name.insert(name.to_owned(), Arc::new(stmt));
                put_message(to_client, b'1', &[]);
            }
            b'S' => put_message(to_client, b'Z', &[b"I"]),
            b'H' => {}
            b'Q' => match stmts.deallocate(&input[5..h.wire_len], b'I') {
                Some(done) => done.encode(to_client),
                None => break,
            },
            // Closing a named statement is the client's business only (server statements
            // are shared), as in `rewrite`: no server round trip for it and its Sync.
            b'C' => {
                let mut body = &input[5..h.wire_len];
                if body.first() != Some(&b'S') {
                    break;
                }
                body.advance(1);
                let name = take_cstr(&mut body).map_err(|_| malformed("bad Close message"))?;
                if name.is_empty() {
                    break;
                }
                stmts.by_name.remove(name);
                put_message(to_client, b'3', &[]);
            }
            _ => break,
        }
        input.advance(h.wire_len);
        answered = true;
    }
    Ok(answered)
}

/// What happens to the reply of a message sent to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// The client asked; its reply goes to the client.
    Forward,
    /// The router injected the message; its reply is dropped.
    Swallow,
    /// Nothing was sent: the router answers the client with this message type itself.
    Synthesize(u8),
    /// Nothing was sent: the router answers a query it ran itself (a DEALLOCATE of the
    /// client's statements) with CommandComplete and ReadyForQuery.
    Done(Done),
}

/// A query the router answered for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Done {
    tag: &'static str,
    /// The transaction status to report (the server's, unchanged by the query).
    status: u8,
}

impl Done {
    fn encode(self, to_client: &mut BytesMut) {
        put_message(to_client, b'C', &[self.tag.as_bytes(), b"\0"]);
        put_message(to_client, b'Z', &[&[self.status]]);
    }
}

/// Which server message completes the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// ParseComplete, BindComplete or CloseComplete.
    Tag(u8),
    /// RowDescription or NoData (after an optional ParameterDescription).
    Describe,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// ReadyForQuery: Sync, Query, FunctionCall.
    Ready,
    /// Not a reply: marks where the client ended a COPY IN (CopyDone/CopyFail) before the
    /// server said the COPY had started.
    CopyEnd,
}

#[derive(Debug)]
struct Expect {
    reply: Reply,
    ends: Ends,
    learn: Learn,
}

/// What the router learns from how a request ends.
#[derive(Debug)]
enum Learn {
    Nothing,
    /// A Parse of this server statement: the server holds it if the Parse succeeds, and may
    /// or may not if it fails or is skipped.
    Parsed(Key),
    /// The Execute of a client's `DEALLOCATE name` ([`Effect::Deallocates`]): the client's
    /// statement (this one, not one it prepared under the name since) is gone if it succeeds.
    Deallocated(Box<(String, Arc<Statement>)>),
}

/// The ordered replies the router still expects from the server.
#[derive(Default, Debug)]
pub struct Replies {
    queue: VecDeque<Expect>,
    /// The server is in COPY IN and the client has not ended it: Postgres ignores Sync and
    /// Flush until CopyDone/CopyFail, so they expect no reply.
    copy_in: bool,
    /// The server reported an error before the client's Sync reached the router (a
    /// pipeline sent in pieces): the server ignores every message up to that Sync, so they
    /// expect no reply.
    skipping: bool,
    /// The router wrote a ReadyForQuery of its own ([`Reply::Done`]): the relay may give the
    /// server back without waiting for one from it.
    ready_sent: bool,
}

impl Replies {
    /// Nothing is owed by the server (a server skipping to a Sync owes its ReadyForQuery).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && !self.skipping
    }

    /// Whether the router answered a query with its own ReadyForQuery since the last call.
    pub fn take_ready_sent(&mut self) -> bool {
        std::mem::take(&mut self.ready_sent)
    }

    /// True if the client message `tag` arrives while the server skips to the next Sync:
    /// it gets no reply. The Sync itself ends the skipping and is tracked as usual.
    fn skip_to_sync(&mut self, tag: u8) -> bool {
        if !self.skipping {
            return false;
        }
        if tag == b'S' {
            self.skipping = false;
            return false;
        }
        true
    }

    fn push(&mut self, reply: Reply, ends: Ends) {
        self.queue.push_back(Expect {
            reply,
            ends,
            learn: Learn::Nothing,
        });
    }

    /// Whether [`Replies::pump`] has anything to do.
    #[inline]
    pub fn due(&self) -> bool {
        self.queue.front().is_some_and(|h| {
            matches!(h.reply, Reply::Synthesize(_) | Reply::Done(_)) || h.ends == Ends::CopyEnd
        })
    }

    /// Writes the router's own replies that are now due (at the head of the queue).
    pub fn pump(&mut self, to_client: &mut BytesMut) {
        while let Some(head) = self.queue.front() {
            match (head.reply, head.ends) {
                (Reply::Synthesize(tag), _) => {
                    to_client.put_u8(tag);
                    to_client.put_i32(4);
                }
                (Reply::Done(done), _) => {
                    done.encode(to_client);
                    self.ready_sent = true;
                }
                (_, Ends::CopyEnd) => {} // a COPY that never started
                _ => return,
            }
            self.queue.pop_front();
        }
    }

    /// The client sent CopyDone or CopyFail.
    fn copy_end(&mut self) {
        if self.copy_in {
            self.copy_in = false;
        } else {
            self.push(Reply::Forward, Ends::CopyEnd);
        }
    }

    /// The server started a COPY IN (CopyInResponse): the Syncs the client sent after the
    /// COPY's message and before ending the COPY are ignored by the server.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i].ends {
                Ends::CopyEnd => {
                    self.queue.remove(i);
                    return;
                }
                Ends::Ready => {
                    self.queue.remove(i);
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// True when the server message with this tag must be read whole before deciding
    /// (it may be dropped).
    pub fn needs_whole(&self, tag: u8) -> bool {
        matches!(tag, b'1' | b'3')
            && matches!(self.queue.front(), Some(e) if e.reply == Reply::Swallow)
    }

    /// Accounts for one server message; returns whether it goes to the client. Statements
    /// that parse successfully are added to `known`; a client statement its DEALLOCATE drops
    /// is removed from `client`.
    pub fn on_server(
        &mut self,
        tag: u8,
        server: &mut ServerStatements,
        known: &KnownStatements,
        client: &mut ClientStatements,
    ) -> bool {
        let Some(head) = self.queue.front() else {
            return true; // asynchronous messages outside any request
        };
        match (tag, head.ends) {
            (b'Z', _) => {
                self.queue.pop_front();
                true
            }
            (b'G', _) => {
                self.copy_in_started();
                true
            }
            (b'E', Ends::Ready) => {
                self.copy_in = false;
                true // a Query's error: its ReadyForQuery follows
            }
            (b'E', _) => {
                self.copy_in = false;
                // The failing message and everything up to the next Sync get no reply.
                while let Some(e) = self.queue.front() {
                    if e.ends == Ends::Ready {
                        break;
                    }
                    let e = self.queue.pop_front().expect("front exists");
                    if let Learn::Parsed(k) = e.learn {
                        server.failed(&k);
                    }
                }
                // No Sync yet: what the client sends until it is skipped too.
                self.skipping = self.queue.is_empty();
                true
            }
            (b'1' | b'2' | b'3', Ends::Tag(t)) if t == tag => {
                let e = self.queue.pop_front().expect("front exists");
                if let Learn::Parsed(k) = e.learn {
                    known.insert(k);
                }
                e.reply != Reply::Swallow
            }
            (b'C' | b'I' | b's', Ends::Execute) => {
                let e = self.queue.pop_front().expect("front exists");
                if let (b'C', Learn::Deallocated(d)) = (tag, e.learn) {
                    client.deallocated(*d);
                }
                true
            }
            (b'C', Ends::Ready) if matches!(head.learn, Learn::Deallocated(_)) => {
                let head = self.queue.front_mut().expect("front exists");
                if let Learn::Deallocated(d) = std::mem::replace(&mut head.learn, Learn::Nothing) {
                    client.deallocated(*d);
                }
                true
            }
            (b'T' | b'n', Ends::Describe) => {
                self.queue.pop_front();
                true
            }
            (b'1' | b'2' | b'3', _) => {
                tracing::warn!(tag = %(tag as char), queue = ?self.queue, "reply does not match the expected one");
                true
            }
            _ => true,
        }
    }
}

/// What the caller does with the current client message after [`rewrite`].
pub enum Step {
    /// The message is not complete enough yet to decide.
    NeedMore,
    /// `consumed` bytes were taken from the input (and replaced in the output as needed);
    /// the next `pass` bytes of the input go to the server unchanged.
    Done { pass: usize },
}

fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.put_u8(tag);
    out.put_i32(len as i32);
    for p in parts {
        out.put_slice(p);
    }
}

fn malformed(what: &'static str) -> FrameError {
    FrameError::Startup(what)
}

/// Makes sure the server holds `stmt`, injecting a Parse (and evicting the least recently
/// used statement with a Close when the cache is full).
fn ensure_prepared(
    stmt: &Statement,
    out: &mut BytesMut,
    server: &mut ServerStatements,
    replies: &mut Replies,
) {
    if !server.has(&stmt.key) {
        prepare(stmt, Reply::Swallow, out, server, replies);
    }
}

/// Sends the Parse of `stmt`, which the server does not hold (or may not: then a Close
/// goes first), making room first when the cache is full.
fn prepare(
    stmt: &Statement,
    reply: Reply,
    out: &mut BytesMut,
    server: &mut ServerStatements,
    replies: &mut Replies,
) {
    evict_if_full(out, server, replies);
    if server.unsure.remove(&stmt.key) {
        close(&stmt.name, out, replies);
    }
    put_message(out, b'P', &[stmt.name.as_bytes(), b"\0", &stmt.body]);
    server.insert(stmt.key);
    replies.queue.push_back(Expect {
        reply,
        ends: Ends::Tag(b'1'),
        learn: Learn::Parsed(stmt.key),
    });
}

/// Closes the server statement `name`; the reply is dropped.
fn close(name: &str, out: &mut BytesMut, replies: &mut Replies) {
    put_message(out, b'C', &[b"S", name.as_bytes(), b"\0"]);
    replies.push(Reply::Swallow, Ends::Tag(b'3'));
}

/// Keeps the statements the server may hold under [`SERVER_CACHE_SIZE`]: closes one the
/// router is unsure of, else the least recently used.
fn evict_if_full(out: &mut BytesMut, server: &mut ServerStatements, replies: &mut Replies) {
    if server.entries.len() + server.unsure.len() < SERVER_CACHE_SIZE {
        return;
    }
    let victim = match server.unsure.iter().next().copied() {
        Some(k) => {
            server.unsure.remove(&k);
            Some(k)
        }
        None => server.oldest().inspect(|k| {
            server.entries.remove(k);
        }),
    };
    if let Some(k) = victim {
        close(&server_name(&k), out, replies);
    }
}

/// Prepares the placeholder that a client's rewritten `DEALLOCATE name` (about to be sent)
/// drops, afresh: one may be left over from a DEALLOCATE that did not get to run. The
/// injected Parse of an empty query cannot fail, not even in a failed transaction, so it
/// never makes the server skip what follows. Returns what the DEALLOCATE's success teaches.
fn deallocating(
    name: &str,
    stmts: &ClientStatements,
    out: &mut BytesMut,
    replies: &mut Replies,
) -> Learn {
    close(PLACEHOLDER, out, replies);
    put_message(out, b'P', &[PLACEHOLDER.as_bytes(), b"\0\0\0\0"]);
    replies.push(Reply::Swallow, Ends::Tag(b'1'));
    match stmts.by_name.get(name) {
        Some(stmt) => Learn::Deallocated(Box::new((name.to_owned(), stmt.clone()))),
        None => Learn::Nothing,
    }
}

/// Rewrites one client message (its header is `h`, at the start of `input`) for transaction
/// mode, writing what the server must see to `out` and recording the replies to expect.
pub fn rewrite(
    h: Header,
    input: &mut BytesMut,
    out: &mut BytesMut,
    stmts: &mut ClientStatements,
    server: &mut ServerStatements,
    replies: &mut Replies,
    status: u8,
) -> Result<Step, FrameError> {
    if replies.skip_to_sync(h.tag) {
        // Ignored by the server: passed as they are, so nothing of them takes effect here
        // either (a skipped Parse leaves no statement, as on the server).
        return Ok(Step::Done { pass: h.wire_len });
    }
    match h.tag {
        b'P' | b'B' | b'D' | b'C' | b'E' | b'S' | b'F' | b'Q' | b'c' | b'f' => {}
        // Flush, CopyData: no reply of their own.
        _ => return Ok(Step::Done { pass: h.wire_len }),
    }
    match h.tag {
        b'P' | b'D' | b'C' if input.len() < h.wire_len => Ok(Step::NeedMore),
        b'P' => {
            let msg = input.split_to(h.wire_len).freeze();
            let mut body = &msg[5..];
            let name = take_cstr(&mut body).map_err(|_| malformed("bad Parse message"))?;
            if name.is_empty() {
                let effect = effect_of(query_of(body), stmts);
                if let Some(Effect::Deallocates(_)) = effect {
                    put_message(out, b'P', &[b"\0", &with_placeholder_deallocate(body)]);
                } else {
                    out.extend_from_slice(&msg);
                }
                stmts.unnamed_effect = effect;
                replies.push(Reply::Forward, Ends::Tag(b'1'));
                return Ok(Step::Done { pass: 0 });
            }
            let stmt = Arc::new(Statement::new(msg.slice_ref(body), stmts));
            stmts.by_name.insert(name.to_owned(), stmt.clone());
            if server.has(&stmt.key) {
                replies.push(Reply::Synthesize(b'1'), Ends::Tag(b'1'));
            } else {
                prepare(&stmt, Reply::Forward, out, server, replies);
            }
            Ok(Step::Done { pass: 0 })
        }
        b'B' => {
            // Only the portal and statement names are needed; parameters stream through.
            let mut body = &input[5..];
            let (Ok(portal), Ok(stmt_name)) = (take_cstr(&mut body), take_cstr(&mut body)) else {
                return if input.len() >= h.wire_len || input.len() > 5 + 2 * 64 + 1024 {
                    Err(malformed("bad Bind message"))
                } else {
                    Ok(Step::NeedMore)
                };
            };
            replies.push(Reply::Forward, Ends::Tag(b'2'));
            let stmt = stmts
                .by_name
                .get(stmt_name)
                .filter(|_| !stmt_name.is_empty())
                .cloned();
            let effect = match &stmt {
                Some(s) => s.effect.as_ref(),
                None if stmt_name.is_empty() => stmts.unnamed_effect.as_ref(),
                None => None,
            };
            if effect.is_some() || !stmts.effect_portals.is_empty() {
                let effect = effect.cloned();
                stmts.bound(portal, effect);
            }
            let stmt = match stmt {
                Some(s) => s,
                // Unnamed or unknown: the server answers (an unknown name is its error).
                None => return Ok(Step::Done { pass: h.wire_len }),
            };
            let prefix_len = input.len() - body.len();
            let portal_end = 5 + input[5..].iter().position(|&b| b == 0).expect("parsed") + 1;
            // Inject the Parse before the Bind, which is then re-queued after it.
            let bind = replies.queue.pop_back().expect("just pushed");
            ensure_prepared(&stmt, out, server, replies);
            replies.queue.push_back(bind);
            let new_len = h.wire_len - 1 - (prefix_len - portal_end) + stmt.name.len() + 1;
            out.put_u8(b'B');
            out.put_i32(new_len as i32);
            out.put_slice(&input[5..portal_end]);
            out.put_slice(stmt.name.as_bytes());
            out.put_u8(0);
            input.advance(prefix_len);
            Ok(Step::Done {
                pass: h.wire_len - prefix_len,
            })
        }
        b'D' | b'C' => {
            let msg = input.split_to(h.wire_len).freeze();
            let mut body = &msg[5..];
            if body.is_empty() {
                return Err(malformed("bad Describe/Close message"));
            }
            let kind = body.get_u8();
            let name = take_cstr(&mut body).map_err(|_| malformed("bad Describe/Close message"))?;
            let ends = if h.tag == b'D' {
                Ends::Describe
            } else {
                Ends::Tag(b'3')
            };
            if kind != b'S' || name.is_empty() {
                out.extend_from_slice(&msg);
                replies.push(Reply::Forward, ends);
                return Ok(Step::Done { pass: 0 });
            }
            if h.tag == b'C' {
                // Server statements are shared; closing one is the client's business only.
                stmts.by_name.remove(name);
                replies.push(Reply::Synthesize(b'3'), ends);
                return Ok(Step::Done { pass: 0 });
            }
            match stmts.by_name.get(name).cloned() {
                Some(stmt) => {
                    ensure_prepared(&stmt, out, server, replies);
                    put_message(out, b'D', &[b"S", stmt.name.as_bytes(), b"\0"]);
                }
                None => out.extend_from_slice(&msg),
            }
            replies.push(Reply::Forward, ends);
            Ok(Step::Done { pass: 0 })
        }
        b'E' => {
            let mut learn = Learn::Nothing;
            if !stmts.effect_portals.is_empty() {
                if input.len() < h.wire_len {
                    return Ok(Step::NeedMore);
                }
                let mut body = &input[5..h.wire_len];
                let portal = take_cstr(&mut body).map_err(|_| malformed("bad Execute message"))?;
                match stmts.effect_portals.iter().find(|(p, _)| p == portal) {
                    // What follows in the stream may need statements this drops.
                    Some((_, Effect::Drops)) => server.forget_all(),
                    Some((_, Effect::Deallocates(name))) => {
                        learn = deallocating(name, stmts, out, replies);
                    }
                    None => {}
                }
            }
            replies.queue.push_back(Expect {
                reply: Reply::Forward,
                ends: Ends::Execute,
                learn,
            });
            Ok(Step::Done { pass: h.wire_len })
        }
        b'S' | b'F' => {
            if !(h.tag == b'S' && replies.copy_in) {
                replies.push(Reply::Forward, Ends::Ready);
            }
            Ok(Step::Done { pass: h.wire_len })
        }
        b'c' | b'f' => {
            replies.copy_end();
            Ok(Step::Done { pass: h.wire_len })
        }
        b'Q' => {
            if input.len() < h.wire_len {
                if h.wire_len <= WHOLE_QUERY_LIMIT {
                    return Ok(Step::NeedMore);
                }
                // Too long to hold back: assume the worst.
                server.forget_all();
            } else {
                let query = &input[5..h.wire_len];
                if mentions_dropping(query) {
                    // A DEALLOCATE of the client's own statements, with nothing pending on
                    // the server (so its transaction status is known, and not failed): the
                    // router's business only, as server statements are shared.
                    if replies.queue.is_empty() && matches!(status, b'I' | b'T') {
                        if let Some(done) = stmts.deallocate(query, status) {
                            input.advance(h.wire_len);
                            replies.push(Reply::Done(done), Ends::Ready);
                            return Ok(Step::Done { pass: 0 });
                        }
                    }
                    match effect_of(query, stmts) {
                        Some(Effect::Drops) => server.forget_all(),
                        Some(Effect::Deallocates(name)) => {
                            // Behind other requests, or in a transaction that may have failed:
                            // the server answers, dropping the placeholder instead.
                            let learn = deallocating(&name, stmts, out, replies);
                            put_message(out, b'Q', &[PLACEHOLDER_DEALLOCATE, b"\0"]);
                            input.advance(h.wire_len);
                            replies.queue.push_back(Expect {
                                reply: Reply::Forward,
                                ends: Ends::Ready,
                                learn,
                            });
                            return Ok(Step::Done { pass: 0 });
                        }
                        None => {}
                    }
                }
            }
            replies.push(Reply::Forward, Ends::Ready);
            Ok(Step::Done { pass: h.wire_len })
        }
        _ => unreachable!("filtered above"),
    }
}

/// Session mode: statements need no renaming, but the replies are tracked the same way, so
/// the relay knows when the server is idle.
pub fn track(h: Header, replies: &mut Replies) {
    if replies.skip_to_sync(h.tag) {
        return;
    }
    match h.tag {
        b'P' => replies.push(Reply::Forward, Ends::Tag(b'1')),
        b'B' => replies.push(Reply::Forward, Ends::Tag(b'2')),
        b'C' => replies.push(Reply::Forward, Ends::Tag(b'3')),
        b'D' => replies.push(Reply::Forward, Ends::Describe),
        b'E' => replies.push(Reply::Forward, Ends::Execute),
        b'S' if replies.copy_in => {}
        b'S' | b'F' | b'Q' => replies.push(Reply::Forward, Ends::Ready),
        b'c' | b'f' => replies.copy_end(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::sqltext::contains_ci;
    use super::*;

    use crate::protocol::framing::peek_header;

    fn msg(tag: u8, parts: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        put_message(&mut b, tag, parts);
        b
    }

    fn parse(name: &str, query: &str) -> BytesMut {
        msg(b'P', &[name.as_bytes(), b"\0", query.as_bytes(), b"\0\0\0"])
    }

    fn bind(stmt: &str) -> BytesMut {
        msg(b'B', &[b"\0", stmt.as_bytes(), b"\0\0\0\0\0\0\0"])
    }

    impl Replies {
        fn on_server_t(&mut self, tag: u8, sv: &mut ServerStatements) -> bool {
            let mut client = ClientStatements::default();
            self.on_server(tag, sv, &KnownStatements::default(), &mut client)
        }
    }

    #[test]
    fn known_statements_are_answered_without_a_server() {
        let known = KnownStatements::default();
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        run(&[parse("a", "select 1")], &mut st, &mut sv, &mut r);
        assert!(r.on_server(b'1', &mut sv, &known, &mut ClientStatements::default()));
        // Another client prepares the same query and syncs: answered locally, in order.
        let mut other = ClientStatements::default();
        let mut input = BytesMut::new();
        for m in [parse("x", "select 1"), msg(b'S', &[]), bind("x")] {
            input.extend_from_slice(&m);
        }
        let mut to_client = BytesMut::new();
        assert!(answer_without_server(&mut input, &mut other, &known, &mut to_client).unwrap());
        assert_eq!(&to_client[..], b"1\0\0\0\x04Z\0\0\0\x05I");
        assert_eq!(other.len(), 1);
        assert_eq!(input[0], b'B', "the Bind needs a server and stays");
        // An unknown statement is left for a server.
        let mut input = parse("y", "select 2");
        assert!(
            !answer_without_server(&mut input, &mut other, &known, &mut BytesMut::new()).unwrap()
        );
        assert_eq!(input.len(), parse("y", "select 2").len());
        // Closing a named statement and syncing (what tokio-postgres does when a statement
        // is dropped) needs no server either; a portal or the unnamed statement does.
        let mut input = BytesMut::new();
        for m in [msg(b'C', &[b"S", b"x\0"]), msg(b'S', &[])] {
            input.extend_from_slice(&m);
        }
        let mut to_client = BytesMut::new();
        assert!(answer_without_server(&mut input, &mut other, &known, &mut to_client).unwrap());
        assert_eq!(&to_client[..], b"3\0\0\0\x04Z\0\0\0\x05I");
        assert_eq!(other.len(), 0, "x is forgotten");
        for close in [msg(b'C', &[b"P", b"x\0"]), msg(b'C', &[b"S", b"\0"])] {
            let mut input = close.clone();
            assert!(
                !answer_without_server(&mut input, &mut other, &known, &mut BytesMut::new())
                    .unwrap()
            );
            assert_eq!(input.len(), close.len());
        }
    }

    /// Runs client messages through `rewrite`; returns the tags the server would see.
    fn run(
        client: &[BytesMut],
        st: &mut ClientStatements,
        sv: &mut ServerStatements,
        r: &mut Replies,
    ) -> (Vec<u8>, BytesMut) {
        run_in(b'I', client, st, sv, r)
    }

    /// [`run`] with the server's transaction status `status`.
    fn run_in(
        status: u8,
        client: &[BytesMut],
        st: &mut ClientStatements,
        sv: &mut ServerStatements,
        r: &mut Replies,
    ) -> (Vec<u8>, BytesMut) {
        let mut out = BytesMut::new();
        for m in client {
            let mut input = m.clone();
            let h = peek_header(&input).unwrap().unwrap();
            match rewrite(h, &mut input, &mut out, st, sv, r, status).unwrap() {
                Step::Done { pass } => out.extend_from_slice(&input.split_to(pass)),
                Step::NeedMore => panic!("whole message given"),
            }
        }
        let mut tags = Vec::new();
        let mut b = out.clone();
        while let Some(h) = peek_header(&b).unwrap() {
            tags.push(h.tag);
            b.advance(h.wire_len);
        }
        (tags, out)
    }

    #[test]
    fn second_client_reuses_the_server_statement_and_gets_a_router_reply() {
        let mut sv = ServerStatements::default();
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        let mut r = Replies::default();
        let (tags, out) = run(
            &[
                parse("s1", "select 1"),
                bind("s1"),
                msg(b'E', &[b"\0\0\0\0\0"]),
                msg(b'S', &[]),
            ],
            &mut a,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBES");
        assert!(out.windows(3).any(|w| w == b"pr_"), "renamed on the server");
        // The server answers 1 2 C Z: all forwarded, queue drained.
        for t in *b"12CZ" {
            assert!(r.on_server_t(t, &mut sv));
        }
        assert!(r.is_empty());
        // Another client, same query under the same client name: nothing is re-parsed.
        let (tags, _) = run(
            &[parse("s1", "select 1"), bind("s1"), msg(b'S', &[])],
            &mut b,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"BS", "Parse answered by the router");
        let mut to_client = BytesMut::new();
        r.pump(&mut to_client);
        assert_eq!(
            &to_client[..],
            b"1\0\0\0\x04",
            "ParseComplete synthesized in place"
        );
        for t in *b"2Z" {
            assert!(r.on_server_t(t, &mut sv));
        }
        assert!(r.is_empty());
    }

    #[test]
    fn bind_on_a_new_server_injects_a_parse_and_drops_its_reply() {
        let mut st = ClientStatements::default();
        let mut first = ServerStatements::default();
        let mut r = Replies::default();
        run(&[parse("q", "select $1::int")], &mut st, &mut first, &mut r);
        assert!(r.on_server_t(b'1', &mut first));
        let mut second = ServerStatements::default();
        let (tags, _) = run(&[bind("q"), msg(b'S', &[])], &mut st, &mut second, &mut r);
        assert_eq!(tags, b"PBS");
        assert!(
            !r.on_server_t(b'1', &mut second),
            "injected ParseComplete is dropped"
        );
        assert!(r.on_server_t(b'2', &mut second));
        assert!(r.on_server_t(b'Z', &mut second));
        assert!(r.is_empty());
        assert_eq!(second.len(), 1);
    }

    #[test]
    fn an_error_skips_to_sync_and_forgets_failed_parses() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        let (tags, _) = run(
            &[parse("bad", "select nope"), bind("bad"), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBS");
        assert!(r.on_server_t(b'E', &mut sv));
        assert!(sv.is_empty(), "the failed Parse is not cached");
        assert!(r.on_server_t(b'Z', &mut sv));
        assert!(r.is_empty());
    }

    #[test]
    fn close_is_answered_by_the_router_and_query_can_clear() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        run(&[parse("s", "select 2")], &mut st, &mut sv, &mut r);
        r.on_server_t(b'1', &mut sv);
        let (tags, _) = run(
            &[msg(b'C', &[b"S", b"s\0"]), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"S");
        let mut to_client = BytesMut::new();
        r.pump(&mut to_client);
        assert_eq!(&to_client[..], b"3\0\0\0\x04");
        r.on_server_t(b'Z', &mut sv);
        assert!(st.is_empty());
        assert_eq!(sv.len(), 1, "still on the server for other clients");
        run(&[msg(b'Q', &[b"DISCARD ALL\0"])], &mut st, &mut sv, &mut r);
        r.on_server_t(b'C', &mut sv);
        r.on_server_t(b'Z', &mut sv);
        assert!(sv.is_empty());
    }

    #[test]
    fn an_error_before_the_sync_arrives_skips_what_follows() {
        // A pipeline that reaches the router in two pieces; the server fails in the first.
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        let execute = || msg(b'E', &[b"\0\0\0\0\0"]);
        run(
            &[parse("a", "select 1/0"), bind("a"), execute()],
            &mut st,
            &mut sv,
            &mut r,
        );
        for tag in [b'1', b'2', b'E'] {
            assert!(r.on_server_t(tag, &mut sv));
        }
        assert!(!r.is_empty(), "a ReadyForQuery is owed");
        // The rest, up to the Sync, is ignored by the server: passed unchanged, no replies
        // expected, no statement created.
        let (tags, out) = run(
            &[parse("c", "select 3"), bind("c"), execute(), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBES");
        assert!(contains_ci(&out, b"c\0select 3", 0), "not renamed");
        assert_eq!(st.len(), 1, "only \"a\"");
        assert_eq!(sv.len(), 1, "only \"a\"");
        assert!(r.on_server_t(b'Z', &mut sv));
        assert!(r.is_empty());
        // And the next request is tracked as usual.
        let (tags, _) = run(
            &[bind("a"), execute(), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"BES");
        for tag in [b'2', b'C', b'Z'] {
            assert!(r.on_server_t(tag, &mut sv));
        }
        assert!(r.is_empty());
    }

    #[test]
    fn statements_after_a_possible_drop_are_closed_before_parsing() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        let execute = || msg(b'E', &[b"\0\0\0\0\0"]);
        run(
            &[parse("s", "select 1"), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        for tag in [b'1', b'Z'] {
            r.on_server_t(tag, &mut sv);
        }
        assert_eq!(sv.len(), 1);
        // DISCARD ALL through the extended protocol (an unnamed statement), which may fail:
        // once executed, the router no longer knows whether "s" is on the server.
        let (tags, _) = run(
            &[parse("", "/* reset */ DISCARD ALL"), bind(""), execute()],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBE");
        assert!(sv.is_empty());
        // Using "s" again: Close (its reply dropped), Parse (dropped), Bind.
        let (tags, _) = run(
            &[bind("s"), execute(), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"CPBES");
        for (tag, to_client) in [
            (b'1', true),
            (b'2', true),
            (b'C', true),
            (b'3', false),
            (b'1', false),
            (b'2', true),
            (b'C', true),
            (b'Z', true),
        ] {
            assert_eq!(r.on_server_t(tag, &mut sv), to_client, "{}", tag as char);
        }
        assert!(r.is_empty());
        assert_eq!(sv.len(), 1);
        // A statement that merely mentions the words drops nothing.
        run(
            &[parse("", "select discarded from t"), bind(""), execute()],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(sv.len(), 1);
    }

    #[test]
    fn deallocate_of_a_client_statement_is_answered_by_the_router() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        let query = |q: &str| msg(b'Q', &[q.as_bytes(), b"\0"]);
        let known = KnownStatements::default();
        for name in ["_pg3_0", "_pg3_1", "S_1"] {
            run(&[parse(name, name)], &mut st, &mut sv, &mut r);
            r.on_server_t(b'1', &mut sv);
        }
        // Inside a transaction: no server round trip, the status is the server's.
        let (tags, _) = run_in(
            b'T',
            &[query("DEALLOCATE _pg3_0")],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert!(tags.is_empty());
        let mut to_client = BytesMut::new();
        r.pump(&mut to_client);
        assert_eq!(&to_client[..], b"C\0\0\0\x0fDEALLOCATE\0Z\0\0\0\x05T");
        assert!(r.is_empty());
        assert_eq!(st.len(), 2);
        assert_eq!(sv.len(), 3, "server statements are shared");
        // In a failed transaction Postgres refuses it: the server answers, running it against
        // the placeholder, and the client keeps its statement.
        let (tags, out) = run_in(
            b'E',
            &[query("DEALLOCATE _pg3_1")],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"CPQ");
        assert!(out.ends_with(b"Q\0\0\0\x1aDEALLOCATE pr_dealloc\0"));
        for (tag, to_client) in [(b'3', false), (b'1', false), (b'E', true), (b'Z', true)] {
            assert_eq!(r.on_server(tag, &mut sv, &known, &mut st), to_client);
        }
        assert_eq!(st.len(), 2);
        // Pipelined behind another query: the same, and it succeeds.
        let (tags, _) = run_in(
            b'T',
            &[query("select 1"), query("DEALLOCATE _pg3_1")],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"QCPQ");
        for tag in [b'T', b'D', b'C', b'Z', b'3', b'1', b'C', b'Z'] {
            r.on_server(tag, &mut sv, &known, &mut st);
        }
        assert!(r.is_empty());
        assert_eq!(st.len(), 1);
        assert!(sv.unsure.is_empty());
        // Prepared again: the server still holds it, the router answers.
        run(&[parse("_pg3_1", "_pg3_1")], &mut st, &mut sv, &mut r);
        r.pump(&mut BytesMut::new());
        assert!(r.is_empty());
        // A name the client does not have ("S_1" unquoted is s_1): the server's error.
        let (tags, _) = run_in(b'T', &[query("deallocate S_1")], &mut st, &mut sv, &mut r);
        assert_eq!(tags, b"Q");
        r.on_server_t(b'E', &mut sv);
        r.on_server_t(b'Z', &mut sv);
        assert_eq!(st.len(), 2);
        // Just after a checkout (nothing pending): answered, and the server may go back.
        let (tags, _) = run_in(
            b'I',
            &[query("DEALLOCATE _pg3_1")],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert!(tags.is_empty());
        let mut to_client = BytesMut::new();
        r.pump(&mut to_client);
        assert_eq!(&to_client[..], b"C\0\0\0\x0fDEALLOCATE\0Z\0\0\0\x05I");
        assert!(r.is_empty() && r.take_ready_sent());
        assert!(!r.take_ready_sent());
        // Between transactions, without a server.
        let mut input = query("DEALLOCATE \"S_1\";");
        let mut to_client = BytesMut::new();
        assert!(answer_without_server(&mut input, &mut st, &known, &mut to_client).unwrap());
        assert_eq!(&to_client[..], b"C\0\0\0\x0fDEALLOCATE\0Z\0\0\0\x05I");
        assert!(input.is_empty() && st.is_empty());
        // DEALLOCATE ALL also drops what SQL PREPARE made on the server: the server runs it,
        // and the router is then unsure of every server statement.
        let mut input = query("DEALLOCATE ALL");
        assert!(!answer_without_server(&mut input, &mut st, &known, &mut BytesMut::new()).unwrap());
        let (tags, _) = run(&[input], &mut st, &mut sv, &mut r);
        assert_eq!(tags, b"Q");
        assert_eq!((sv.len(), sv.unsure.len()), (0, 3));
    }

    #[test]
    fn deallocate_as_a_prepared_statement_drops_a_placeholder() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        let known = KnownStatements::default();
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        for name in ["_pg3_0", "_pg3_1"] {
            run(&[parse(name, name)], &mut st, &mut sv, &mut r);
            r.on_server_t(b'1', &mut sv);
        }
        let execute = msg(b'E', &[b"\0\0\0\0\0"]);
        let describe = msg(b'D', &[b"P", b"\0"]);
        // psycopg 3 evicting from its cache (libpq's PQsendQueryParams), behind another query
        // of the same pipeline.
        let (tags, out) = run_in(
            b'T',
            &[
                bind("_pg3_1"),
                execute.clone(),
                parse("", "DEALLOCATE _pg3_0"),
                bind(""),
                describe.clone(),
                execute.clone(),
                msg(b'S', &[]),
            ],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"BEPBDCPES");
        assert!(has(&out, b"DEALLOCATE pr_dealloc\0"));
        assert!(
            !has(&out, b"_pg3_0"),
            "the server never sees the client's name"
        );
        assert!(has(&out, b"C\0\0\0\x10Spr_dealloc\0"));
        assert!(has(&out, b"P\0\0\0\x12pr_dealloc\0\0\0\0"));
        // The server's replies: the placeholder's go nowhere, the rest to the client, and the
        // client's statement is gone once the DEALLOCATE succeeded.
        for (tag, to_client) in [
            (b'2', true),
            (b'C', true),
            (b'1', true),
            (b'2', true),
            (b'n', true),
            (b'3', false),
            (b'1', false),
        ] {
            assert_eq!(r.on_server(tag, &mut sv, &known, &mut st), to_client);
        }
        assert_eq!(st.len(), 2);
        assert!(r.on_server(b'C', &mut sv, &known, &mut st));
        assert!(r.on_server(b'Z', &mut sv, &known, &mut st));
        assert!(r.is_empty());
        assert_eq!(st.len(), 1);
        assert_eq!(
            sv.len(),
            2,
            "shared server statements stay, and the router is sure of them"
        );
        assert!(sv.unsure.is_empty());
        // A named statement that deallocates, run when the transaction has failed: the server
        // refuses it, and the client keeps its statement.
        let (tags, out) = run_in(
            b'E',
            &[
                parse("d", "deallocate _pg3_1"),
                bind("d"),
                execute.clone(),
                msg(b'S', &[]),
            ],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBCPES");
        assert!(!has(&out, b"_pg3_1"));
        for (tag, to_client) in [(b'E', true), (b'Z', true)] {
            assert_eq!(r.on_server(tag, &mut sv, &known, &mut st), to_client);
        }
        assert!(r.is_empty());
        assert!(st.by_name.contains_key("_pg3_1"));
        // A DEALLOCATE of a name the client did not prepare through the protocol (its own SQL
        // PREPARE, for the server to answer) goes as it is, and the router is then unsure
        // what the server still holds.
        let (tags, out) = run(
            &[
                parse("", "DEALLOCATE mine"),
                bind(""),
                execute,
                msg(b'S', &[]),
            ],
            &mut st,
            &mut sv,
            &mut r,
        );
        assert_eq!(tags, b"PBES");
        assert!(has(&out, b"DEALLOCATE mine"));
        assert_eq!(sv.len(), 0);
    }

    #[test]
    fn syncs_sent_before_copy_data_get_no_reply() {
        // tokio-postgres: Bind, Execute, Sync, then CopyData..., CopyDone, Sync.
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        run(
            &[bind(""), msg(b'E', &[b"\0\0\0\0\0"]), msg(b'S', &[])],
            &mut st,
            &mut sv,
            &mut r,
        );
        for t in *b"2G" {
            r.on_server_t(t, &mut sv);
        }
        run(
            &[
                msg(b'd', &[b"x"]),
                msg(b'c', &[]),
                msg(b'S', &[]),
                msg(b'C', &[b"S", b"s0\0"]),
                msg(b'S', &[]),
            ],
            &mut st,
            &mut sv,
            &mut r,
        );
        let mut to_client = BytesMut::new();
        for t in *b"CZ" {
            assert!(r.on_server_t(t, &mut sv));
        }
        r.pump(&mut to_client);
        assert_eq!(
            &to_client[..],
            b"3\0\0\0\x04",
            "CloseComplete before the second ReadyForQuery"
        );
        assert!(r.on_server_t(b'Z', &mut sv));
        assert!(r.is_empty());
        // The same when the client ends the COPY before the server's CopyInResponse arrives.
        let mut r = Replies::default();
        run(
            &[
                msg(b'Q', &[b"copy t from stdin\0"]),
                msg(b'd', &[b"x"]),
                msg(b'c', &[]),
            ],
            &mut st,
            &mut sv,
            &mut r,
        );
        for t in *b"GCZ" {
            r.on_server_t(t, &mut sv);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn the_server_cache_is_bounded() {
        let mut st = ClientStatements::default();
        let mut sv = ServerStatements::default();
        let mut r = Replies::default();
        for i in 0..SERVER_CACHE_SIZE + 3 {
            run(
                &[parse(&format!("s{i}"), &format!("select {i}"))],
                &mut st,
                &mut sv,
                &mut r,
            );
        }
        assert_eq!(sv.len(), SERVER_CACHE_SIZE);
    }
}
