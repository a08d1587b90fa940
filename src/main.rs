//! The `podrouter` command line: parse arguments, build the config, call into the library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use podrouter::cli::{
    follow_job, job_rows, job_summary, print_plan, print_recommendations, print_table, AdminClient,
    CliError, JOB_COLUMNS,
};
use podrouter::config::{Config, ConfigSource, PoolMode};
use reqwest::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "podrouter",
    version,
    about = "Tenant-aware router for fleets of PostgreSQL pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Args, Clone)]
struct AdminArgs {
    /// Admin API URL.
    #[arg(long, global = true, env = "PODROUTER_ADMIN_URL")]
    admin_url: Option<String>,
    /// Admin API bearer token.
    #[arg(
        long,
        global = true,
        env = "PODROUTER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Take the admin URL and token from a running `podrouter demo --dir DIR`.
    #[arg(long, global = true, env = "PODROUTER_DEMO_DIR")]
    demo_dir: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router with a config file (the production entry point).
    Serve {
        #[arg(long, default_value = "pods.toml")]
        config: PathBuf,
    },
    /// Start local Postgres pods, a catalog, sample tenants and a router: the embedded default.
    Demo(DemoCli),
    /// Validate a config file; reload the running router's config; list applied versions.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// List, show, create or delete tenants.
    Tenants {
        #[command(subcommand)]
        command: Option<TenantsCommand>,
    },
    /// List pods with their health, replicas and tenant counts; fail a pod over.
    Pods {
        #[command(subcommand)]
        command: Option<PodsCommand>,
    },
    /// Create or update client roles (only a SCRAM verifier is stored).
    Roles {
        #[command(subcommand)]
        command: RolesCommand,
    },
    /// Move a tenant to another pod while it is in use, and follow the move job. Exit status:
    /// 0 succeeded, 1 failed, 2 cancelled or refused (bad arguments, unknown tenant or pod, a
    /// move already running). Ctrl-C cancels the move and waits for it to roll back.
    Move {
        tenant: String,
        /// The pod to move it to.
        #[arg(long)]
        to: String,
        /// Print the job and return instead of following it.
        #[arg(long)]
        detach: bool,
    },
    /// Split a pod: move the subset of its tenants closest to half its load to a new pod
    /// from the `[provider]` (or to --to), as a `split` job of moves, and follow it. Exit
    /// status as for `move`; Ctrl-C cancels the moves not yet done.
    Split {
        pod: String,
        /// An existing pod that accepts tenants, instead of a new one from the provider.
        #[arg(long)]
        to: Option<String>,
        /// Print the plan (tenants to move, each pod's load before and after) and change
        /// nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the job and return instead of following it.
        #[arg(long, conflicts_with = "dry_run")]
        detach: bool,
    },
    /// The autopilot's split recommendations (`[autopilot]`: pods over a threshold, and
    /// since when).
    Recommendations,
    /// List jobs (moves, drains, splits), show or follow one, or cancel one.
    #[command(args_conflicts_with_subcommands = true)]
    Jobs {
        #[command(subcommand)]
        command: Option<JobsCommand>,
        /// Show this job instead of the list.
        id: Option<i64>,
        /// How many jobs to list, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Follow a job until it ends (exit status as for `move`); Ctrl-C cancels it.
    Watch { id: i64 },
    /// Cancel a running job: it rolls back (a move leaves the tenant on its pod) and ends
    /// `cancelled`, or finishes if past its point of no return.
    Cancel {
        id: i64,
        /// Wait for the job to end; exit status as for `move`.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args)]
struct DemoCli {
    /// Directory for the demo's clusters, config and ready.json (reused by a second run).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("podrouter-demo"))]
    dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    pods: usize,
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    #[arg(long, default_value = "127.0.0.1:6432")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9930")]
    admin_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    #[arg(long, default_value = "transaction")]
    pool_mode: PoolMode,
    #[arg(long, default_value_t = 20)]
    pool_size: u32,
    /// Streaming replicas per pod.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Run a skewed synthetic load (pg_sleep, mostly at one pod's tenants) until Ctrl-C,
    /// with short sampler and autopilot windows, so a split is recommended within a minute.
    #[arg(long)]
    load: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate a config; exit 0 when it is usable.
    Check { file: PathBuf },
    /// Make the running router re-read its config file (like SIGHUP). Unsafe changes (a pool
    /// shrunk by more than half, a pod with tenants dropped, a set field left to its default,
    /// a field that needs a restart) are refused unless --force; an invalid file always is.
    Reload {
        #[arg(long)]
        force: bool,
    },
    /// Applied config versions, newest first, with what each changed.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Print the text of one applied config version (passwords redacted).
    Show { version: i64 },
}

#[derive(Subcommand)]
enum TenantsCommand {
    List,
    Show {
        tenant: String,
    },
    /// Create a tenant: its database on a pod (placed by the hash ring unless --pod) and grants.
    Create {
        tenant: String,
        /// Role that may reach the tenant (repeat for more; the first owns the database).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long)]
        pod: Option<String>,
    },
    /// Remove a tenant from the catalog (its database stays unless --drop-database).
    Delete {
        tenant: String,
        #[arg(long)]
        drop_database: bool,
    },
    /// Set a tenant's pool mode: session, transaction, or default (follow its pod/config).
    SetMode {
        tenant: String,
        mode: String,
    },
    /// Hold the tenant's new transactions (running ones finish) on every router.
    Pause {
        tenant: String,
    },
    /// Release a paused tenant's clients.
    Resume {
        tenant: String,
    },
}

#[derive(Subcommand)]
enum PodsCommand {
    List,
    /// Promote a replica of POD (the least lagging one unless --to) and route writes to it.
    /// A primary that still answers is fenced (made read-only) first.
    Failover {
        pod: String,
        /// The replica to promote: its URL as `podrouter pods` lists it, or HOST:PORT.
        #[arg(long)]
        to: Option<String>,
    },
    /// Show one pod with its replicas.
    Show {
        pod: String,
    },
    /// Add a pod (kept across config reloads; `pods delete` removes it). Its primary must
    /// answer as a primary to a superuser (or a user with CREATEDB and CREATEROLE).
    Add {
        name: String,
        /// postgres://USER[:PASSWORD]@HOST[:PORT]
        #[arg(long)]
        primary: String,
        /// A streaming replica's URL (repeat for more).
        #[arg(long = "replica")]
        replicas: Vec<String>,
        /// An HTTP upstream of the pod's application servers (repeat for more).
        #[arg(long = "http")]
        http: Vec<String>,
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        /// Add it closed to new tenants.
        #[arg(long)]
        not_accepting: bool,
        /// session or transaction (default: the config's).
        #[arg(long)]
        pool_mode: Option<PoolMode>,
    },
    /// Close the pod to new tenants and move every tenant off it (a drain job of moves),
    /// following the job; exit status as for `move`.
    Drain {
        pod: String,
        /// Print the job and return instead of following it.
        #[arg(long)]
        detach: bool,
    },
    /// Delete a pod added with `pods add` once no tenant lives there. Pods of the config file
    /// go by removing them there and reloading.
    Delete {
        pod: String,
    },
}

#[derive(Subcommand)]
enum RolesCommand {
    Create {
        name: String,
        #[arg(long, env = "PODROUTER_ROLE_PASSWORD", hide_env_values = true)]
        password: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("podrouter: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let admin = cli.admin;
    match cli.command {
        Command::Serve { config } => {
            let source = ConfigSource::load(&config)?;
            // Registered before start, so an early SIGHUP waits instead of killing us.
            let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("installing the SIGHUP handler")?;
            let listeners = podrouter::service::Listeners::bind(&source.config).await?;
            let running =
                podrouter::service::start_with_source(source, Some(config), listeners).await?;
            running.reload_on_sighup(hup);
            wait_for_stop().await;
            running.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(d) => {
            podrouter::demo::run(podrouter::demo::DemoOptions {
                dir: d.dir,
                pods: d.pods,
                tenants: d.tenants,
                listen: d.listen,
                admin_listen: d.admin_listen,
                http_listen: d.http_listen,
                pool_mode: d.pool_mode,
                pool_size: d.pool_size,
                replicas: d.replicas,
                load: d.load,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} pods, pool mode {}, pool size {})",
                    file.display(),
                    c.pods.len(),
                    c.pool.mode,
                    c.pool.size
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Config {
            command: ConfigCommand::Reload { force },
        } => {
            let v = client(&admin)?
                .call(
                    Method::POST,
                    "/v1/config/reload",
                    Some(json!({"force": force})),
                )
                .await?;
            if admin.json {
                output(&admin, &v, None, &[]);
            } else if v["applied"] == true {
                println!(
                    "applied config version {} ({} changes{})",
                    v["version"],
                    v["diff"].as_array().map_or(0, Vec::len),
                    if v["forced"] == true { ", forced" } else { "" }
                );
                print_table(
                    v["diff"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &["field", "old", "new", "after_restart"],
                );
            } else {
                println!("the config file is unchanged; nothing to apply");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::History { limit },
        } => {
            let v = client(&admin)?
                .call(
                    Method::GET,
                    &format!("/v1/config/history?limit={limit}"),
                    None,
                )
                .await?;
            if admin.json {
                output(&admin, &v, None, &[]);
                return Ok(ExitCode::SUCCESS);
            }
            // The table shows which fields each version changed; --json has the values.
            let rows: Vec<Value> = v["versions"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|ver| {
                    let fields: Vec<&str> = ver["diff"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|c| c["field"].as_str())
                        .collect();
                    json!({
                        "version": ver["version"],
                        "applied_at": ver["applied_at"],
                        "forced": ver["forced"],
                        "hash": ver["hash"].as_str().map(|h| h.get(..12).unwrap_or(h)),
                        "changed": fields.join(","),
                    })
                })
                .collect();
            print_table(
                &rows,
                &["version", "applied_at", "forced", "hash", "changed"],
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Show { version },
        } => {
            let v = client(&admin)?
                .call(Method::GET, &format!("/v1/config/history/{version}"), None)
                .await?;
            if admin.json {
                output(&admin, &v, None, &[]);
            } else {
                print!("{}", v["config"].as_str().unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tenants { command } => {
            let client = client(&admin)?;
            let (v, list) = match command.unwrap_or(TenantsCommand::List) {
                TenantsCommand::List => (
                    client.call(Method::GET, "/v1/tenants", None).await?,
                    Some("tenants"),
                ),
                TenantsCommand::Show { tenant } => (
                    client
                        .call(Method::GET, &format!("/v1/tenants/{tenant}"), None)
                        .await?,
                    None,
                ),
                TenantsCommand::Create { tenant, roles, pod } => (
                    client
                        .call(
                            Method::POST,
                            "/v1/tenants",
                            Some(json!({"name": tenant, "roles": roles, "pod": pod})),
                        )
                        .await?,
                    None,
                ),
                TenantsCommand::SetMode { tenant, mode } => {
                    let mode = match mode.as_str() {
                        "default" => serde_json::Value::Null,
                        m => json!(m.parse::<PoolMode>().map_err(anyhow::Error::msg)?),
                    };
                    (
                        client
                            .call(
                                Method::PATCH,
                                &format!("/v1/tenants/{tenant}"),
                                Some(json!({ "pool_mode": mode })),
                            )
                            .await?,
                        None,
                    )
                }
                TenantsCommand::Pause { tenant } => (
                    client
                        .call(Method::POST, &format!("/v1/tenants/{tenant}/pause"), None)
                        .await?,
                    None,
                ),
                TenantsCommand::Resume { tenant } => (
                    client
                        .call(Method::POST, &format!("/v1/tenants/{tenant}/resume"), None)
                        .await?,
                    None,
                ),
                TenantsCommand::Delete {
                    tenant,
                    drop_database,
                } => (
                    client
                        .call(
                            Method::DELETE,
                            &format!("/v1/tenants/{tenant}?drop_database={drop_database}"),
                            None,
                        )
                        .await?,
                    None,
                ),
            };
            output(
                &admin,
                &v,
                list,
                &[
                    "name",
                    "pod",
                    "route_version",
                    "state",
                    "roles",
                    "pool_mode",
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pods {
            command: None | Some(PodsCommand::List),
        } => {
            let v = client(&admin)?.call(Method::GET, "/v1/pods", None).await?;
            output(&admin, &v, Some("pods"), POD_COLUMNS);
            if !admin.json {
                print_replicas(v["pods"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pods {
            command: Some(PodsCommand::Failover { pod, to }),
        } => {
            let v = client(&admin)?
                .call(
                    Method::POST,
                    &format!("/v1/pods/{pod}/failover"),
                    Some(json!({ "to": to })),
                )
                .await?;
            if admin.json {
                output(&admin, &v, None, &[]);
            } else if v["state"] == "succeeded" {
                println!(
                    "pod {pod} failed over from {} to {} in {} ms (promoted: {}, old primary fenced: {})",
                    v["result"]["from"].as_str().unwrap_or("?"),
                    v["result"]["to"].as_str().unwrap_or("?"),
                    v["result"]["took_ms"],
                    v["result"]["promoted"],
                    v["result"]["fenced_old_primary"],
                );
            }
            if v["state"] != "succeeded" {
                eprintln!(
                    "podrouter: failover of pod {pod} failed: {}",
                    v["error"].as_str().unwrap_or("unknown error")
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pods {
            command: Some(command),
        } => pods(&admin, command).await,
        Command::Move { tenant, to, detach } => {
            let started = client(&admin)?
                .call(
                    Method::POST,
                    &format!("/v1/tenants/{tenant}/move"),
                    Some(json!({ "to": to })),
                )
                .await;
            run_job(&admin, started, detach).await
        }
        Command::Split {
            pod,
            to,
            dry_run,
            detach,
        } => split(&admin, &pod, to, dry_run, detach).await,
        Command::Recommendations => {
            let v = client(&admin)?
                .call(Method::GET, "/v1/recommendations", None)
                .await?;
            if admin.json {
                output(&admin, &v, None, &[]);
            } else {
                print_recommendations(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs { command, id, limit } => jobs(&admin, command, id, limit).await,
        Command::Roles {
            command: RolesCommand::Create { name, password },
        } => {
            let v = client(&admin)?
                .call(
                    Method::POST,
                    "/v1/roles",
                    Some(json!({"name": name, "password": password})),
                )
                .await?;
            output(&admin, &v, None, &["name"]);
            Ok(ExitCode::SUCCESS)
        }
    }
}

const POD_COLUMNS: &[&str] = &[
    "name",
    "primary",
    "weight",
    "accepting",
    "tenants",
    "health",
    "origin",
];

/// The pods' replicas as one table (after the pods table).
fn print_replicas(pods: &[Value]) {
    let replicas: Vec<Value> = pods
        .iter()
        .flat_map(|p| {
            let pod = p["name"].clone();
            p["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut r| {
                    r["pod"] = pod.clone();
                    r
                })
        })
        .collect();
    if !replicas.is_empty() {
        println!();
        print_table(
            &replicas,
            &["pod", "url", "health", "lag_bytes", "lag_seconds"],
        );
    }
}

/// `pods show|add|drain|delete` (list and failover are handled in `run`).
async fn pods(admin: &AdminArgs, command: PodsCommand) -> anyhow::Result<ExitCode> {
    let client = client(admin)?;
    let v = match command {
        PodsCommand::List | PodsCommand::Failover { .. } => unreachable!("handled in run"),
        PodsCommand::Drain { pod, detach } => {
            let started = client
                .call(Method::POST, &format!("/v1/pods/{pod}/drain"), None)
                .await;
            return run_job(admin, started, detach).await;
        }
        PodsCommand::Show { pod } => {
            client
                .call(Method::GET, &format!("/v1/pods/{pod}"), None)
                .await?
        }
        PodsCommand::Add {
            name,
            primary,
            replicas,
            http,
            weight,
            not_accepting,
            pool_mode,
        } => {
            client
                .call(
                    Method::POST,
                    "/v1/pods",
                    Some(json!({
                        "name": name, "primary": primary, "replicas": replicas, "http": http,
                        "weight": weight, "accepting": !not_accepting, "pool_mode": pool_mode,
                    })),
                )
                .await?
        }
        PodsCommand::Delete { pod } => {
            let v = client
                .call(Method::DELETE, &format!("/v1/pods/{pod}"), None)
                .await?;
            output(admin, &v, None, &["deleted"]);
            return Ok(ExitCode::SUCCESS);
        }
    };
    output(admin, &v, None, POD_COLUMNS);
    if !admin.json {
        print_replicas(std::slice::from_ref(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// `split POD`: the plan (`--dry-run`), or the split job followed to its end.
async fn split(
    admin: &AdminArgs,
    pod: &str,
    to: Option<String>,
    dry_run: bool,
    detach: bool,
) -> anyhow::Result<ExitCode> {
    let client = client(admin)?;
    let path = format!("/v1/pods/{pod}/split");
    if dry_run {
        let v = match client
            .call(
                Method::POST,
                &path,
                Some(json!({"to": to, "dry_run": true})),
            )
            .await
        {
            Ok(v) => v,
            Err(e) => return refused(e),
        };
        if admin.json {
            output(admin, &v, None, &[]);
            return Ok(ExitCode::SUCCESS);
        }
        let plan = &v["plan"];
        let target = plan["target"].as_str().unwrap_or("?");
        println!(
            "split {pod} onto {target}{}: {} of {} tenant(s), {} to copy (dry run: nothing changed)\n",
            if to.is_none() {
                " (a new pod from the provider)"
            } else {
                ""
            },
            plan["moves"].as_array().map_or(0, Vec::len),
            plan["before"][pod]["tenants"],
            indicatif::HumanBytes(plan["bytes_to_move"].as_u64().unwrap_or(0)),
        );
        print_plan(plan);
        return Ok(ExitCode::SUCCESS);
    }
    if to.is_none() && !admin.json {
        println!("splitting {pod}: the pod provider makes the new pod first, then the planned tenants move");
    }
    let started = client
        .call(Method::POST, &path, Some(json!({ "to": to })))
        .await;
    run_job(admin, started, detach).await
}

/// A refused request (4xx): the API's error on stderr, exit status 2; anything else is an
/// error (exit 1).
fn refused(e: CliError) -> anyhow::Result<ExitCode> {
    match e {
        CliError::Api {
            status: 400..=499, ..
        } => {
            eprintln!("podrouter: {e}");
            Ok(ExitCode::from(2))
        }
        e => Err(e.into()),
    }
}

/// A job just started (`move`, `pods drain`, `split`): refused → exit 2; detached → print it;
/// otherwise follow it to its end.
async fn run_job(
    admin: &AdminArgs,
    started: Result<Value, CliError>,
    detach: bool,
) -> anyhow::Result<ExitCode> {
    let job = match started {
        Ok(job) => job,
        Err(e) => return refused(e),
    };
    if detach {
        output(admin, &job, None, JOB_COLUMNS);
        return Ok(ExitCode::SUCCESS);
    }
    let id = job["id"]
        .as_i64()
        .context("the API answered a job without an id")?;
    follow(admin, &client(admin)?, id).await
}

/// Follows job `id` to its end; prints how it ended (the job as JSON with --json).
async fn follow(admin: &AdminArgs, client: &AdminClient, id: i64) -> anyhow::Result<ExitCode> {
    let (end, job) = follow_job(client, id, admin.json).await?;
    if admin.json {
        output(admin, &job, None, &[]);
    } else if end == podrouter::cli::JobEnd::Succeeded {
        println!("{}", job_summary(&job));
    } else {
        eprintln!("podrouter: {}", job_summary(&job));
    }
    Ok(ExitCode::from(end.exit_code()))
}

async fn jobs(
    admin: &AdminArgs,
    command: Option<JobsCommand>,
    id: Option<i64>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let client = client(admin)?;
    match (command, id) {
        (Some(JobsCommand::Watch { id }), _) => follow(admin, &client, id).await,
        (Some(JobsCommand::Cancel { id, wait }), _) => {
            let v = client
                .call(Method::DELETE, &format!("/v1/jobs/{id}"), None)
                .await?;
            if wait {
                return follow(admin, &client, id).await;
            }
            if admin.json {
                output(admin, &v, None, &[]);
            } else {
                println!("cancelling job {id}; follow it with `podrouter jobs watch {id}`");
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(id)) => {
            let v = client
                .call(Method::GET, &format!("/v1/jobs/{id}"), None)
                .await?;
            if admin.json {
                output(admin, &v, None, &[]);
                return Ok(ExitCode::SUCCESS);
            }
            print_table(&job_rows(std::slice::from_ref(&v)), JOB_COLUMNS);
            for key in ["params", "result"] {
                if !v[key].is_null() {
                    println!("{key}: {}", v[key]);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, None) => {
            let v = client
                .call(Method::GET, &format!("/v1/jobs?limit={limit}"), None)
                .await?;
            if admin.json {
                output(admin, &v, None, &[]);
            } else {
                print_table(
                    &job_rows(v["jobs"].as_array().map(Vec::as_slice).unwrap_or(&[])),
                    JOB_COLUMNS,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn client(a: &AdminArgs) -> anyhow::Result<AdminClient> {
    AdminClient::new(a.admin_url.clone(), a.token.clone(), a.demo_dir.clone())
        .context("admin API client")
}

fn output(a: &AdminArgs, v: &Value, list: Option<&str>, columns: &[&str]) {
    if a.json {
        println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
        return;
    }
    match list {
        Some(key) => print_table(v[key].as_array().map(Vec::as_slice).unwrap_or(&[]), columns),
        None => print_table(std::slice::from_ref(v), columns),
    }
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
}
