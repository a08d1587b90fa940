//! The admin subcommands (`podrouter tenants|pods|roles ...`): thin clients of the admin API.
//! They print a table by default and the API's JSON with `--json`.

use serde_json::Value;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin API at {url}: {source}; is podrouter running? (set --admin-url or PODROUTER_ADMIN_URL)")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// Where the admin API is and how to authenticate to it.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `demo_dir` (a `podrouter demo` directory) supplies URL and token from its ready.json.
    pub fn new(
        url: Option<String>,
        token: Option<String>,
        demo_dir: Option<PathBuf>,
    ) -> Result<AdminClient, CliError> {
        let (mut base, mut tok) = (url, token);
        if let Some(dir) = demo_dir {
            let path = dir.join("ready.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                CliError::Usage(format!(
                    "cannot read {}: {e}; is `podrouter demo --dir {}` running?",
                    path.display(),
                    dir.display()
                ))
            })?;
            let ready: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
            base = base.or_else(|| ready["admin_url"].as_str().map(str::to_owned));
            tok = tok.or_else(|| ready["admin_token"].as_str().map(str::to_owned));
        }
        Ok(AdminClient {
            base: base
                .unwrap_or_else(|| "http://127.0.0.1:9930".into())
                .trim_end_matches('/')
                .to_owned(),
            token: tok,
            http: reqwest::Client::new(),
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| CliError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status >= 400 {
            return Err(CliError::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("error").to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or("the admin API failed without a message")
                    .to_owned(),
            });
        }
        Ok(v)
    }
}

/// Prints rows of a JSON list as an aligned table of the given columns.
pub fn print_table(items: &[Value], columns: &[&str]) {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|it| columns.iter().map(|c| cell(&it[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in rows {
        println!("{}", line(r));
    }
}

// === jobs ===

/// How a followed job ended, and the exit status the CLI gives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed,
    Cancelled,
    /// The user stopped waiting (a second Ctrl-C); the job goes on or ends by itself.
    Abandoned,
}

impl JobEnd {
    /// 0 succeeded, 1 failed, 2 cancelled, 130 (SIGINT) when the user stopped waiting.
    pub fn exit_code(self) -> u8 {
        match self {
            JobEnd::Succeeded => 0,
            JobEnd::Failed => 1,
            JobEnd::Cancelled => 2,
            JobEnd::Abandoned => 130,
        }
    }
}

/// How often a followed job is read.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// How long the admin API may be unreachable while a job is followed.
const FOLLOW_OUTAGE: std::time::Duration = std::time::Duration::from_secs(30);

/// `done/total unit` of a job's progress, bytes in human units.
pub fn progress_text(p: &Value) -> String {
    let (done, total) = (
        p["done"].as_u64().unwrap_or(0),
        p["total"].as_u64().unwrap_or(0),
    );
    let unit = p["unit"].as_str().unwrap_or("");
    match unit {
        "bytes" => format!(
            "{} of {}",
            indicatif::HumanBytes(done),
            indicatif::HumanBytes(total)
        ),
        "bytes behind" => format!("{} behind", indicatif::HumanBytes(total)),
        _ if total == 0 => String::new(),
        u => format!("{done} of {total} {u}"),
    }
}

/// What a job is about: `move acme → pod1`, `drain pod0`.
fn job_title(job: &Value) -> String {
    let kind = job["kind"].as_str().unwrap_or("job");
    match (job["tenant"].as_str(), job["pod"].as_str()) {
        (Some(t), Some(p)) => format!("{kind} {t} → {p}"),
        (Some(t), None) => format!("{kind} {t}"),
        (None, Some(p)) => format!("{kind} {p}"),
        (None, None) => kind.to_owned(),
    }
}

/// The jobs list as table rows (progress as text).
pub fn job_rows(jobs: &[Value]) -> Vec<Value> {
    jobs.iter()
        .map(|j| {
            let mut row = j.clone();
            row["progress"] = Value::String(progress_text(&j["progress"]));
            row
        })
        .collect()
}

pub const JOB_COLUMNS: &[&str] = &[
    "id",
    "kind",
    "state",
    "phase",
    "progress",
    "tenant",
    "pod",
    "parent",
    "started_at",
    "error",
];

/// Where a followed job's progress goes: a bar on a terminal, phase lines otherwise.
enum Display {
    Bar(indicatif::ProgressBar),
    /// Phase lines on stdout (or stderr with --json, whose stdout is the final JSON).
    Lines {
        to_stderr: bool,
    },
}

impl Display {
    fn new(json: bool) -> Display {
        use std::io::IsTerminal;
        if json || !std::io::stdout().is_terminal() {
            return Display::Lines { to_stderr: json };
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Display::Bar(bar)
    }

    fn line(&self, text: &str) {
        match self {
            Display::Bar(b) => b.println(text),
            Display::Lines { to_stderr: true } => eprintln!("{text}"),
            Display::Lines { to_stderr: false } => println!("{text}"),
        }
    }

    /// Shows the job's progress; `changed` when its phase or state is new; `detail` (the
    /// running moves of a plan job) goes after the phase on the bar.
    fn update(&self, job: &Value, changed: bool, started: std::time::Instant, detail: &str) {
        let phase = job["phase"].as_str().unwrap_or("?");
        let progress = progress_text(&job["progress"]);
        match self {
            Display::Bar(b) => {
                let p = &job["progress"];
                let (done, total) = (
                    p["done"].as_u64().unwrap_or(0),
                    p["total"].as_u64().unwrap_or(0),
                );
                let counted = total > 0 && p["unit"] != "bytes behind";
                let template = match (counted, p["unit"].as_str()) {
                    (false, _) => "{spinner} {prefix} {msg}",
                    (true, Some("bytes")) => {
                        "{spinner} {prefix} {msg} [{bar:30}] {bytes}/{total_bytes} ({eta})"
                    }
                    (true, _) => "{spinner} {prefix} {msg} [{bar:30}] {pos}/{len}",
                };
                b.set_style(
                    indicatif::ProgressStyle::with_template(template)
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                b.set_prefix(format!("job {} {}", job["id"], job_title(job)));
                b.set_length(total);
                b.set_position(done.min(total));
                let message = match (counted, progress.is_empty()) {
                    (false, false) => format!("{phase}: {progress}"),
                    _ => phase.to_owned(),
                };
                b.set_message(if detail.is_empty() {
                    message
                } else {
                    format!("{message} ({detail})")
                });
                if changed {
                    b.println(format!(
                        "[{:6.1}s] {phase}",
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
            Display::Lines { .. } if changed => self.line(&format!(
                "[{:6.1}s] job {} {}: {phase}{}",
                started.elapsed().as_secs_f64(),
                job["id"],
                job_title(job),
                if progress.is_empty() {
                    String::new()
                } else {
                    format!(" ({progress})")
                }
            )),
            Display::Lines { .. } => {}
        }
    }

    fn finish(&self) {
        if let Display::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// The moves of a plan job (`split`, `drain`, `rebalance`: `progress.moves`, each with its
/// child move job) as last shown, so each tenant's changes are shown once.
#[derive(Default)]
struct PlanMoves {
    shown: std::collections::HashMap<String, String>,
}

impl PlanMoves {
    /// Reads the phase of each running child move (one small GET each; a plan runs a few at
    /// a time). Returns a line per tenant whose status changed, and the running ones in
    /// short (`tenant1 copy, tenant2 catch_up`) for the bar.
    async fn update(&mut self, client: &AdminClient, job: &Value) -> (Vec<String>, String) {
        let Some(steps) = job["progress"]["moves"].as_array() else {
            return (Vec::new(), String::new());
        };
        let (mut lines, mut running) = (Vec::new(), Vec::new());
        for step in steps {
            let tenant = step["tenant"].as_str().unwrap_or("?");
            let state = step["state"].as_str().unwrap_or("?");
            let child = step["job"].as_i64();
            let status = match (state, child) {
                ("waiting", _) => continue,
                ("pending" | "running", Some(id)) => {
                    let phase = client
                        .call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
                        .await
                        .ok()
                        .and_then(|c| c["phase"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| state.to_owned());
                    running.push(format!("{tenant} {phase}"));
                    phase
                }
                (_, _) => match step["error"].as_str() {
                    Some(e) => format!("{state}: {e}"),
                    None => state.to_owned(),
                },
            };
            if self.shown.get(tenant) == Some(&status) {
                continue;
            }
            self.shown.insert(tenant.to_owned(), status.clone());
            // A move that just succeeded: how long its clients were held (read once).
            let status = match (state, child) {
                ("succeeded", Some(id)) => client
                    .call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
                    .await
                    .ok()
                    .and_then(|c| c["result"]["pause_ms"].as_u64())
                    .map(|ms| format!("{status} (clients paused {ms} ms)"))
                    .unwrap_or(status),
                _ => status,
            };
            let job = child.map(|id| format!(" (job {id})")).unwrap_or_default();
            lines.push(format!(
                "  {tenant} → {}{job}: {status}",
                step["to"].as_str().unwrap_or("?")
            ));
        }
        (lines, running.join(", "))
    }
}

/// Follows job `id` until it ends, showing its phase and progress. Ctrl-C cancels the job
/// (`DELETE /v1/jobs/{id}`) and goes on waiting for it to end (it rolls back); a second
/// Ctrl-C stops waiting. Returns how it ended and the job as last read.
pub async fn follow_job(
    client: &AdminClient,
    id: i64,
    json: bool,
) -> Result<(JobEnd, Value), CliError> {
    let display = Display::new(json);
    let started = std::time::Instant::now();
    let mut last_seen: Option<(String, String)> = None;
    let mut last_ok = std::time::Instant::now();
    let mut cancel_sent = false;
    let mut plan_moves = PlanMoves::default();
    // From here on Ctrl-C (SIGINT) cancels the job instead of killing the CLI.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Usage(format!("cannot handle Ctrl-C: {e}")))?;
    loop {
        let job = match client
            .call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
            .await
        {
            Ok(job) => {
                last_ok = std::time::Instant::now();
                job
            }
            Err(e @ CliError::Unreachable { .. }) if last_ok.elapsed() < FOLLOW_OUTAGE => {
                tracing::debug!("admin API unreachable while following job {id}: {e}");
                tokio::time::sleep(FOLLOW_POLL).await;
                continue;
            }
            Err(e) => {
                display.finish();
                return Err(e);
            }
        };
        let state = job["state"].as_str().unwrap_or("?").to_owned();
        let now = (
            state.clone(),
            job["phase"].as_str().unwrap_or("?").to_owned(),
        );
        let changed = last_seen.as_ref() != Some(&now);
        let (moves, detail) = plan_moves.update(client, &job).await;
        display.update(&job, changed, started, &detail);
        for m in moves {
            display.line(&format!("[{:6.1}s] {m}", started.elapsed().as_secs_f64()));
        }
        last_seen = Some(now);
        let end = match state.as_str() {
            "succeeded" => Some(JobEnd::Succeeded),
            "failed" => Some(JobEnd::Failed),
            "cancelled" => Some(JobEnd::Cancelled),
            _ => None,
        };
        if let Some(end) = end {
            display.finish();
            return Ok((end, job));
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = interrupts.recv() => {
                if cancel_sent {
                    display.finish();
                    eprintln!("podrouter: stopped waiting; job {id} goes on ending by itself (`podrouter jobs {id}`)");
                    return Ok((JobEnd::Abandoned, job));
                }
                cancel_sent = true;
                display.line(&format!("cancelling job {id} (it rolls back; Ctrl-C again to stop waiting)"));
                match client.call(reqwest::Method::DELETE, &format!("/v1/jobs/{id}"), None).await {
                    Ok(_) => {}
                    // It ended meanwhile: the next read says how.
                    Err(CliError::Api { code, .. }) if code == "job_finished" => {}
                    Err(e) => display.line(&format!("podrouter: cannot cancel job {id}: {e}")),
                }
            }
        }
    }
}

/// One line saying how a job ended, e.g. `job 12 move acme → pod1 succeeded in 3.1 s (pause 40 ms)`.
pub fn job_summary(job: &Value) -> String {
    let state = job["state"].as_str().unwrap_or("?");
    let mut s = format!("job {} {} {state}", job["id"], job_title(job));
    let secs = match (job["started_at"].as_str(), job["finished_at"].as_str()) {
        (Some(a), Some(b)) => chrono::DateTime::parse_from_rfc3339(b)
            .ok()
            .zip(chrono::DateTime::parse_from_rfc3339(a).ok())
            .map(|(b, a)| (b - a).num_milliseconds() as f64 / 1000.0),
        _ => None,
    };
    if let Some(secs) = secs {
        s.push_str(&format!(" in {secs:.1} s"));
    }
    let r = &job["result"];
    if let Some(ms) = r["pause_ms"].as_u64() {
        s.push_str(&format!(" (clients paused {ms} ms)"));
    }
    if let Some(moves) = r["moves"].as_array() {
        let ok = moves.iter().filter(|m| m["state"] == "succeeded").count();
        let to = r["target"]
            .as_str()
            .map(|t| format!(" to {t}"))
            .unwrap_or_default();
        s.push_str(&format!(" ({ok} of {} tenant(s) moved{to})", moves.len()));
    }
    if let Some(e) = job["error"].as_str() {
        s.push_str(&format!(": {e}"));
    }
    s
}

// === plans and recommendations ===

/// `a → b` of a figure before and after a plan.
fn before_after(before: &Value, after: &Value, show: impl Fn(&Value) -> String) -> String {
    let (b, a) = (show(before), show(after));
    if b == a {
        b
    } else {
        format!("{b} → {a}")
    }
}

/// A figure of the API as a float; `+ 0.0` turns a -0.0 (a sum of nothing) into 0.
fn float(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) + 0.0
}

fn percent(v: &Value) -> String {
    format!("{:.0}%", 100.0 * float(v))
}

fn busy(v: &Value) -> String {
    format!("{:.2}", float(v))
}

/// An RFC 3339 time of the API to the second.
fn seconds(v: &Value) -> Value {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .unwrap_or_else(|| v.clone())
}

fn bytes(v: &Value) -> String {
    indicatif::HumanBytes(v.as_u64().unwrap_or(0)).to_string()
}

/// Prints a plan (a split's or a rebalance's, as the API answers it): the moves with each
/// tenant's load and size, each pod's figures before → after, and the planner's note.
pub fn print_plan(plan: &Value) {
    let moves: Vec<Value> = plan["moves"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| {
            serde_json::json!({
                "tenant": m["tenant"], "from": m["from"], "to": m["to"],
                "busy s/s": busy(&m["busy"]), "size": bytes(&m["bytes"]),
            })
        })
        .collect();
    if moves.is_empty() {
        println!("no moves");
    } else {
        print_table(&moves, &["tenant", "from", "to", "busy s/s", "size"]);
    }
    let empty = serde_json::Map::new();
    let before = plan["before"].as_object().unwrap_or(&empty);
    let after = plan["after"].as_object().unwrap_or(&empty);
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    let pods: Vec<Value> = names
        .iter()
        .map(|p| {
            let (b, a) = (&plan["before"][p.as_str()], &plan["after"][p.as_str()]);
            let figure =
                |key: &str, show: fn(&Value) -> String| before_after(&b[key], &a[key], show);
            serde_json::json!({
                "pod": p,
                "tenants": figure("tenants", |v| v.as_u64().unwrap_or(0).to_string()),
                "busy s/s": figure("busy", busy),
                "size": figure("bytes", bytes),
                "utilisation": figure("utilisation", percent),
            })
        })
        .collect();
    println!();
    print_table(
        &pods,
        &["pod", "tenants", "busy s/s", "size", "utilisation"],
    );
    if let Some(note) = plan["note"].as_str().filter(|n| !n.is_empty()) {
        println!("\n{note}");
    }
}

/// Prints `GET /v1/recommendations`: the autopilot's mode, then each recommendation with
/// why, since when, whether it stands, and what its split would move.
pub fn print_recommendations(v: &Value) {
    let recs = v["recommendations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    println!(
        "autopilot mode {}, judged at {}: {} recommendation(s)",
        v["mode"].as_str().unwrap_or("?"),
        seconds(&v["updated_at"])
            .as_str()
            .unwrap_or("(not yet: no sample so far)"),
        recs.len()
    );
    if recs.is_empty() {
        return;
    }
    let rows: Vec<Value> = recs
        .iter()
        .map(|r| {
            let plan = &r["plan"];
            let moves: Vec<&str> = plan["moves"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter_map(|m| m["tenant"].as_str())
                .collect();
            serde_json::json!({
                "pod": r["pod"], "kind": r["kind"],
                "ready": if r["ready"] == true { "yes" } else { "not yet" },
                "since": seconds(&r["since"]), "reason": r["reason"],
                "plan": format!("{} → {}", moves.join(","), plan["target"].as_str().unwrap_or("?")),
            })
        })
        .collect();
    println!();
    print_table(&rows, &["pod", "kind", "ready", "since", "reason", "plan"]);
    for r in recs.iter().filter(|r| r["ready"] == true) {
        let pod = r["pod"].as_str().unwrap_or("?");
        println!("\nto carry it out: `podrouter split {pod}` (`--dry-run` shows the plan again)");
    }
}
