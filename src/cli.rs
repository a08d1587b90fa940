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
