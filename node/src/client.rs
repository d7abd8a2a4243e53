//! Commands that talk to a running node over its HTTP API.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use mycel_api::{PeerView, StatusView};
use serde::de::DeserializeOwned;

use crate::cli::ClientArgs;
use mycel_api::types::RuntimeInfo;

/// The node's API base URL: `--node`, else `MYCEL_NODE`, else the running
/// local node's (from its data dir), else the default address.
pub fn node_url(args: &ClientArgs) -> Result<String> {
    if let Some(url) = &args.node {
        return Ok(url.trim_end_matches('/').to_string());
    }
    if let Some(url) = std::env::var("MYCEL_NODE").ok().filter(|u| !u.is_empty()) {
        return Ok(url.trim_end_matches('/').to_string());
    }
    if let Ok(info) = RuntimeInfo::read(&args.data_dir.resolve()?) {
        return Ok(info.api);
    }
    Ok(format!("http://{}", crate::config::DEFAULT_API))
}

/// GETs `path` from the node and decodes the JSON body.
pub fn get_json<T: DeserializeOwned>(base: &str, path: &str) -> Result<T> {
    call_json(base, path, None::<&()>, Duration::from_secs(60))
}

/// POSTs `body` as JSON; the answer decoded, or the node's error.
pub fn post_json<B: serde::Serialize, T: DeserializeOwned>(base: &str, path: &str, body: &B) -> Result<T> {
    call_json(base, path, Some(body), Duration::from_secs(60))
}

/// [`post_json`] for requests that run work through the swarm before they
/// answer (a search embedding a large corpus): waits up to an hour.
pub fn post_json_slow<B: serde::Serialize, T: DeserializeOwned>(base: &str, path: &str, body: &B) -> Result<T> {
    call_json(base, path, Some(body), Duration::from_secs(3600))
}

/// What a node answered a request that may run as a job: the job to
/// follow (`202 Accepted`), or the answer itself (a node that does not run
/// such requests as jobs).
pub enum Answer<T> {
    Job(mycel_api::Submitted),
    Now(T),
}

/// POSTs `body` asking to be answered at once with a job to follow
/// (`Prefer: respond-async`), for work that takes a while.
pub fn post_json_async<B: serde::Serialize, T: DeserializeOwned>(
    base: &str,
    path: &str,
    body: &B,
) -> Result<Answer<T>> {
    let (status, mut response) = call(base, path, Some(body), Duration::from_secs(3600), true)?;
    if status == 202 {
        return Ok(Answer::Job(decode(base, path, &mut response)?));
    }
    Ok(Answer::Now(decode(base, path, &mut response)?))
}

fn call_json<B: serde::Serialize, T: DeserializeOwned>(
    base: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<T> {
    let (_, mut response) = call(base, path, body, timeout, false)?;
    decode(base, path, &mut response)
}

/// Sends the request; a successful response (its status and body), or the
/// node's error.
fn call<B: serde::Serialize>(
    base: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
    respond_async: bool,
) -> Result<(u16, ureq::http::Response<ureq::Body>)> {
    let url = format!("{base}{path}");
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    // A node off loopback wants its bearer token (MYCEL_API_TOKEN).
    let token = std::env::var("MYCEL_API_TOKEN").ok().filter(|t| !t.is_empty());
    let auth = token.map(|t| format!("Bearer {t}"));
    let sent = match body {
        Some(b) => {
            let mut request = agent.post(&url);
            if let Some(a) = &auth {
                request = request.header("authorization", a);
            }
            if respond_async {
                request = request.header("prefer", "respond-async");
            }
            request.send_json(b)
        }
        None => {
            let mut request = agent.get(&url);
            if let Some(a) = &auth {
                request = request.header("authorization", a);
            }
            request.call()
        }
    };
    let mut response = sent.map_err(|e| match e {
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            anyhow!("cannot reach a node at {base}: is `mycel node` running? (or pass --node URL / set MYCEL_NODE)")
        }
        other => anyhow!("request to {url} failed: {other}"),
    })?;
    let status = response.status();
    if !status.is_success() {
        let body: mycel_api::types::ErrorBody =
            response.body_mut().read_json().unwrap_or_else(|_| mycel_api::types::ErrorBody::new(status.to_string()));
        return Err(anyhow!("the node at {base} answered {status}: {}", body.error));
    }
    Ok((status.as_u16(), response))
}

fn decode<T: DeserializeOwned>(base: &str, path: &str, response: &mut ureq::http::Response<ureq::Body>) -> Result<T> {
    // Task results can be large (a vector per text): allow up to 1 GiB.
    response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_json()
        .with_context(|| format!("decoding the answer from {base}{path}"))
}

/// `mycel status`.
pub fn status(args: &ClientArgs) -> Result<()> {
    let base = node_url(args)?;
    let s: StatusView = get_json(&base, "/api/v1/status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("peer id        {}", s.peer_id);
    println!("version        {}", s.version);
    println!("api            {base}");
    println!("uptime         {}s", s.uptime_s);
    println!("connected      {} peers", s.connected_peers);
    let scope = if s.adverts == "used" { "; only the workers of the models it used" } else { "" };
    println!("known          {} peers (from adverts{scope})", s.known_peers);
    println!(
        "models         {}",
        if s.models.is_empty() {
            "none".to_string()
        } else {
            s.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
        }
    );
    for a in &s.listen_addrs {
        println!("listening      {a}");
    }
    let r = &s.reachability;
    println!(
        "reachable      {} (hole punches: {} worked, {} failed)",
        match r.reach.as_str() {
            "private" => "no: behind NAT or a firewall; peers come through relays",
            "public" => "yes: peers dial it directly",
            _ => "not known yet (peers are asked soon after joining)",
        },
        r.hole_punches_ok,
        r.hole_punches_failed
    );
    for a in &r.relayed_addrs {
        println!("relayed        {a}");
    }
    Ok(())
}

/// `mycel peers`.
pub fn peers(args: &ClientArgs) -> Result<()> {
    let base = node_url(args)?;
    let peers: Vec<PeerView> = get_json(&base, "/api/v1/peers")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no peers yet");
        return Ok(());
    }
    let rows: Vec<[String; 6]> = peers
        .iter()
        .map(|p| {
            [
                p.peer_id.clone(),
                if p.models.is_empty() {
                    "-".into()
                } else {
                    p.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(",")
                },
                format!(
                    "{} cores, {:.1} GiB{}",
                    p.cores,
                    p.memory_bytes as f64 / (1u64 << 30) as f64,
                    if p.gpus.is_empty() { String::new() } else { format!(", {}", p.gpus.join(",")) }
                ),
                format!("{}/{} (+{} queued)", p.active_shards, p.capacity, p.queued_shards),
                format!("{:.1}s ago", p.last_seen_ms as f64 / 1000.0),
                if p.connection.is_empty() { "-".into() } else { p.connection.clone() },
            ]
        })
        .collect();
    print_table(&["PEER", "MODELS", "HARDWARE", "LOAD", "LAST SEEN", "CONNECTION"], &rows);
    Ok(())
}

/// Prints rows under headers, columns padded to their widest cell.
pub fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
