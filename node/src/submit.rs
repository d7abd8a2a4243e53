//! `mycel submit embed|generate`, `mycel verify`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mycel_api::GenerationView;
use mycel_api::{SubmitRequest, Submitted, TaskView};
use mycel_protocol::{FinishReason, Generation, JobReceipt, Receipt, ShardOutput, Signed, StagedReceipt, Wire};

use crate::cli::{ClientArgs, FeedbackArgs, SubmitCommand, SubmitCommon, TaskArgs, VerifyArgs};
use crate::client::{get_json, node_url, post_json, post_json_slow, print_table};

pub fn run(cmd: SubmitCommand) -> Result<()> {
    match cmd {
        SubmitCommand::Embed(args) => {
            let inputs = read_inputs(&args.input)?;
            let view = submit_and_wait(&args.common, "embed", inputs, None, None)?;
            let vectors = view.embeddings.clone().context("the node reported no embeddings")?;
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?,
            );
            for v in &vectors {
                serde_json::to_writer(&mut out, v)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            finish(&args.out, &view)
        }
        SubmitCommand::Classify(args) => {
            let base = node_url(&args.client)?;
            let train = match &args.train {
                None => Vec::new(),
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .enumerate()
                    .map(|(n, l)| {
                        serde_json::from_str::<mycel_api::Labelled>(l).with_context(|| {
                            format!("{}:{}: expected {{\"text\": ..., \"label\": ...}}", path.display(), n + 1)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let request = mycel_api::ClassifyRequest {
                inputs: read_inputs(&args.input)?,
                labels: args.labels.clone(),
                train,
                model: args.model.clone(),
            };
            let result = run_job(&base, "/api/v1/classify", &request, |view| view.classify)?;
            for p in &result.predictions {
                println!("{}", serde_json::to_string(p)?);
            }
            eprintln!(
                "{} ({}): {} texts embedded through the swarm, {} from the cache{}",
                result.model,
                result.method,
                result.embedded,
                result.cached,
                result.cross_validated_accuracy.map_or(String::new(), |a| format!(", cross-validated accuracy {a:.3}"))
            );
            Ok(())
        }
        SubmitCommand::Summarize(args) => {
            let base = node_url(&args.client)?;
            let text = if args.input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?
            };
            let request = mycel_api::SummarizeRequest {
                text,
                model: args.model.clone(),
                chunk_chars: Some(args.chunk_chars),
                fan_in: None,
                max_tokens: None,
            };
            let submitted: Submitted = post_json_slow(&base, "/api/v1/summarize", &request)?;
            let view = wait_for(&base, &submitted)?;
            let stages = view.pipeline.as_ref().map(|p| p.stages.clone()).unwrap_or_default();
            eprintln!("{}: {} chunks and summaries over {} levels", view.model, view.shards, stages.len());
            staged_answer(&base, &view, &stages, args.out.as_deref())
        }
        SubmitCommand::Search(args) => {
            let base = node_url(&args.client)?;
            let corpus = read_inputs(&args.corpus)?;
            let request = mycel_api::SearchRequest {
                corpus,
                query: args.query.clone(),
                top: Some(args.top),
                model: args.model.clone(),
            };
            let started = Instant::now();
            let result = run_job(&base, "/api/v1/search", &request, |view| view.search)?;
            if args.client.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
                return Ok(());
            }
            let rows: Vec<[String; 3]> = result
                .hits
                .iter()
                .map(|h| [format!("{:.4}", h.score), (h.index + 1).to_string(), h.text.chars().take(100).collect()])
                .collect();
            print_table(&["SCORE", "LINE", "TEXT"], &rows);
            eprintln!(
                "{} in {:.1}s: {} texts embedded through the swarm{}, {} from the cache",
                result.model,
                started.elapsed().as_secs_f64(),
                result.embedded,
                if result.tasks.is_empty() { String::new() } else { format!(" (task {})", result.tasks.join(", ")) },
                result.cached
            );
            Ok(())
        }
        SubmitCommand::Generate(args) => {
            let inputs = match (&args.prompt, &args.input) {
                (Some(p), None) => vec![p.clone()],
                (None, Some(file)) => read_inputs(file)?,
                _ => bail!("give either --prompt TEXT or --input FILE"),
            };
            let mut common = args.common.clone();
            if let Some(e) = args.ensemble {
                ensure!(common.model.is_none(), "--ensemble chooses the models; leave out --model");
                common.model = Some(e.model().into());
            }
            let view = submit_and_wait(&common, "generate", inputs, Some((args.max_tokens, args.seed)), args.n)?;
            let answers = view.generations.clone().context("the node reported no answers")?;
            if let Some(e) = &view.ensemble {
                return ensemble_answer(&common, &view, e, args.out.as_deref());
            }
            match &args.out {
                Some(path) => {
                    let mut out =
                        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
                    for g in &answers {
                        serde_json::to_writer(&mut out, g)?;
                        out.write_all(b"\n")?;
                    }
                    finish(path, &view)
                }
                None => {
                    for g in &answers {
                        println!("{}", g.text);
                    }
                    Ok(())
                }
            }
        }
    }
}

/// Lines of a file ("-" for stdin): plain text, or JSONL with a `text` field.
pub(crate) fn read_inputs(path: &Path) -> Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let mut out = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim_start().starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
            let text = value
                .get("text")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{}:{}: a JSON line needs a \"text\" string field", path.display(), n + 1))?;
            out.push(text.to_string());
        } else {
            out.push(line);
        }
    }
    ensure!(!out.is_empty(), "{} has no lines", path.display());
    Ok(out)
}

/// An ensemble's answer, and each stage's receipt beside `out`.
fn ensemble_answer(
    common: &SubmitCommon,
    view: &TaskView,
    e: &mycel_api::EnsembleView,
    out: Option<&Path>,
) -> Result<()> {
    eprintln!("{} ({}): {}", e.method, view.model, e.reason);
    staged_answer(&node_url(&common.client)?, view, &e.stages, out)
}

/// The answer of work made of several tasks, printed or written to `out`
/// with each stage's receipt beside it.
fn staged_answer(base: &str, view: &TaskView, stages: &[mycel_api::EnsembleStage], out: Option<&Path>) -> Result<()> {
    let answer = view.generations.as_ref().and_then(|g| g.first()).context("no answer came back")?;
    let Some(out) = out else {
        println!("{}", answer.text);
        return Ok(());
    };
    let mut file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    serde_json::to_writer(&mut file, answer)?;
    file.write_all(b"\n")?;
    for (i, stage) in stages.iter().enumerate() {
        let stage_view: TaskView = get_json(base, &format!("/api/v1/tasks/{}", stage.task))?;
        let receipt = stage_view.receipt.context("a stage has no receipt")?;
        let mut path = out.as_os_str().to_os_string();
        path.push(format!(".stage-{i}.receipt"));
        std::fs::write(&path, hex::decode(receipt).context("receipt is not hex")?)?;
        eprintln!(
            "stage {i}: {} on {}, task {}, receipt {}",
            stage.role,
            stage.model,
            stage.task,
            path.to_string_lossy()
        );
    }
    eprintln!("result: {}", out.display());
    // One receipt over the whole job: every stage, and the answer as its
    // executor signed it.
    if let Some(receipt) = &view.receipt {
        let path = receipt_path(out);
        std::fs::write(&path, hex::decode(receipt).context("the job's receipt is not hex")?)?;
        eprintln!("receipt: {} (check with `mycel verify {}`)", path.display(), path.display());
    }
    Ok(())
}

fn submit_and_wait(
    common: &SubmitCommon,
    kind: &str,
    inputs: Vec<String>,
    generate: Option<(u32, u64)>,
    n: Option<u32>,
) -> Result<TaskView> {
    let base = node_url(&common.client)?;
    let request = SubmitRequest {
        model: common.model.clone(),
        redundancy: common.redundancy,
        spot_check: common.spot_check,
        items_per_shard: common.items_per_shard,
        max_tokens: generate.map(|g| g.0),
        seed: generate.map(|g| g.1),
        n,
        ..SubmitRequest::new(kind, inputs)
    };
    let submitted: Submitted = post_json(&base, "/api/v1/tasks", &request)?;
    wait_for(&base, &submitted)
}

/// Follows a task (or a job) to its end, with a progress line on a terminal.
/// Runs a request the node may take as a job: followed with a progress bar
/// (on a terminal) until it ends, then its answer out of the job's view.
fn run_job<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    body: &B,
    answer: impl FnOnce(TaskView) -> Option<T>,
) -> Result<T> {
    match crate::client::post_json_async(base, path, body)? {
        crate::client::Answer::Now(result) => Ok(result),
        crate::client::Answer::Job(submitted) => {
            let view = wait_for(base, &submitted)?;
            answer(view).with_context(|| format!("job {} ended without an answer", submitted.task))
        }
    }
}

fn wait_for(base: &str, submitted: &Submitted) -> Result<TaskView> {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    loop {
        let view: TaskView = get_json(base, &format!("/api/v1/tasks/{}", submitted.task))?;
        if terminal {
            eprint!("\r{}   ", progress_line(&submitted.task, &view, started.elapsed()));
        }
        match view.state.as_str() {
            "done" => {
                if terminal {
                    eprintln!();
                }
                return Ok(view);
            }
            "failed" => {
                if terminal {
                    eprintln!();
                }
                bail!("task {} failed: {}", submitted.task, view.error.unwrap_or_default());
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `3f2a9c1e [#########...........] 9/20 shards | 4 peers working | eta 12s`
fn progress_line(task: &str, view: &TaskView, elapsed: Duration) -> String {
    const WIDTH: usize = 20;
    let filled = (view.shards_done * WIDTH).checked_div(view.shards).unwrap_or(0);
    let eta = if view.shards_done > 0 {
        let per = elapsed.as_secs_f64() / view.shards_done as f64;
        format!("{:.0}s", per * (view.shards - view.shards_done) as f64)
    } else {
        "?".into()
    };
    format!(
        "{} [{}{}] {}/{} shards | {} peers working | eta {eta}",
        task.get(..8).unwrap_or(task),
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        view.shards_done,
        view.shards,
        view.peers_working,
    )
}

/// Writes the receipt beside the output and says who did what.
fn finish(out: &Path, view: &TaskView) -> Result<()> {
    let receipt_hex = view.receipt.as_ref().context("the node gave no receipt")?;
    let path = receipt_path(out);
    std::fs::write(&path, hex::decode(receipt_hex).context("receipt is not hex")?)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for e in view.executors.iter().flatten() {
        *counts.entry(e.as_str()).or_default() += 1;
    }
    eprintln!("task {}: {} shards by {} peers", view.task, view.shards, counts.len());
    for (peer, n) in counts {
        eprintln!("  {peer}  {n} shards");
    }
    eprintln!("result: {}\nreceipt: {} (check with `mycel verify {}`)", out.display(), path.display(), path.display());
    Ok(())
}

fn receipt_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".receipt");
    PathBuf::from(s)
}

/// `mycel verify RECEIPT [--result FILE]`: offline. Takes a task's receipt
/// or a staged task's (every stage's receipt checked).
pub fn verify(args: VerifyArgs) -> Result<()> {
    let bytes = std::fs::read(&args.receipt).with_context(|| format!("reading {}", args.receipt.display()))?;
    let result = args.result.clone().unwrap_or_else(|| {
        let s = args.receipt.to_string_lossy();
        PathBuf::from(s.strip_suffix(".receipt").unwrap_or(&s).to_string())
    });
    let output = if result.exists() {
        Some(read_output(&result)?)
    } else if args.result.is_some() {
        bail!("{} not found", result.display());
    } else {
        None
    };
    // Every kind shares the envelope; the signing domain says which it is.
    let signed = Signed::<Receipt>::decode(&bytes).context("not a mycel receipt")?;
    if signed.verify().is_err()
        && let Some((signed, job)) =
            Signed::<JobReceipt>::decode(&bytes).ok().and_then(|s| s.verify().ok().map(|job| (s, job)))
    {
        return verify_job(&signed, &job, output.as_ref(), &result);
    }
    let staged = Signed::<StagedReceipt>::decode(&bytes).ok().filter(|_| signed.verify().is_err());
    if let Some(staged) = staged {
        let tree = staged.verify().context("the receipt's signature is invalid")?;
        tree.check_tree(staged.signer(), output.as_ref()).context("the staged receipt does not hold up")?;
        if output.is_some() {
            println!("ok: {} matches the last stage, every shard's part as its executor signed it", result.display());
        }
        for (i, stage) in tree.stages.iter().enumerate() {
            let receipt = stage.verify().context("a stage's signature is invalid")?;
            println!("ok: stage {i}: {}", summary(&receipt));
        }
        println!(
            "ok: staged receipt for task {} signed by {}, {} stages, every signature valid",
            hex::encode(tree.task.0),
            staged.signer().to_peer_id(),
            tree.stages.len()
        );
        return Ok(());
    }
    let receipt = signed.verify().context("the receipt's signature is invalid")?;
    receipt.check_claims().context("the receipt does not hold up")?;
    if let Some(output) = &output {
        // The whole result, and every shard's slice of it against what its
        // executor signed.
        receipt.check_output(output).with_context(|| format!("{} does not match the receipt", result.display()))?;
        println!("ok: {} matches the receipt, every shard's part as its executor signed it", result.display());
    }
    let checked = receipt.spot.checked_shards(receipt.shards.len());
    println!(
        "ok: spot checks committed to before any award: {} of {} shards run twice ({})",
        checked.len(),
        receipt.shards.len(),
        if checked.is_empty() { "none".to_string() } else { format!("{checked:?}") }
    );
    println!(
        "ok: receipt for task {} signed by {}, {}, every signature valid",
        hex::encode(receipt.task.0),
        signed.signer().to_peer_id(),
        summary(&receipt)
    );
    Ok(())
}

/// A job's receipt (its signature already checked): every task's receipt
/// and the answer against what its executor signed.
fn verify_job(signed: &Signed<JobReceipt>, job: &JobReceipt, answer: Option<&ShardOutput>, path: &Path) -> Result<()> {
    job.check_tree(signed.signer(), answer).context("the job's receipt does not hold up")?;
    for (i, task) in job.tasks.iter().enumerate() {
        let receipt = task.verify().context("a task's signature is invalid")?;
        println!("ok: task {i} ({}): {}", hex::encode(receipt.task.0), summary(&receipt));
    }
    let place = format!("item {} of task {}", job.answer_item, job.answer_task);
    match answer {
        Some(_) => println!("ok: {} is the answer, {place}, as its executor signed it", path.display()),
        None => println!("ok: the answer is {place}, as its executor signed it (give the answer file to check it)"),
    }
    println!(
        "ok: receipt for {} job {} signed by {}, {} tasks, every signature valid",
        job.kind,
        hex::encode(job.job.0),
        signed.signer().to_peer_id(),
        job.tasks.len()
    );
    Ok(())
}

/// "N shards by M executors".
fn summary(receipt: &Receipt) -> String {
    let executors = receipt.shards.iter().map(|c| *c.signer()).collect::<std::collections::BTreeSet<_>>().len();
    format!("{} shards by {executors} executors", receipt.shards.len())
}

/// A result file back into the output the receipt committed to.
fn read_output(path: &Path) -> Result<ShardOutput> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut vectors: Vec<Vec<f32>> = Vec::new();
    let mut answers: Vec<Generation> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        if value.is_object() {
            let g: GenerationView =
                serde_json::from_value(value).with_context(|| format!("{}: not an answer", at()))?;
            let finish = match g.finish.as_str() {
                "eos" => FinishReason::EndOfSequence,
                "length" => FinishReason::Length,
                "stop" => FinishReason::Stop,
                other => bail!("{}: unknown finish {other:?}", at()),
            };
            answers.push(Generation {
                text: g.text,
                tokens: g.tokens,
                finish,
                logprobs: g.logprobs,
                tool_calls: g.tool_calls,
            });
        } else {
            vectors.push(serde_json::from_value(value).with_context(|| format!("{}: not a vector", at()))?);
        }
    }
    if !answers.is_empty() {
        ensure!(vectors.is_empty(), "{} mixes answers and vectors", path.display());
        return Ok(ShardOutput::Generations(answers));
    }
    let dimensions = vectors.first().map_or(0, Vec::len) as u32;
    Ok(ShardOutput::Embeddings { dimensions, values: vectors.concat() })
}

/// How a finish reason is written in result files and the API.
pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::EndOfSequence => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        _ => "other",
    }
}

/// `mycel tasks`.
pub fn tasks(args: &ClientArgs) -> Result<()> {
    let base = node_url(args)?;
    let list: Vec<mycel_api::TaskSummary> = get_json(&base, "/api/v1/tasks")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no tasks on this node (give it some with `mycel submit`)");
    } else {
        let rows: Vec<[String; 3]> =
            list.iter().map(|t| [t.task.clone(), t.state.clone(), format!("{}/{}", t.shards_done, t.shards)]).collect();
        print_table(&["TASK", "STATE", "SHARDS DONE"], &rows);
    }
    Ok(())
}

/// `mycel feedback ID SCORE`: a verdict on a routed task's answer.
pub fn feedback(args: &FeedbackArgs) -> Result<()> {
    let base = node_url(&args.client)?;
    let routed: mycel_router::Routed =
        post_json(&base, &format!("/api/v1/tasks/{}/feedback", args.id), &mycel_api::Feedback { score: args.score })?;
    println!("noted: {} scored {} on this prompt (the router learns from it)", routed.decision.model, args.score);
    Ok(())
}

/// `mycel task ID`.
pub fn task(args: &TaskArgs) -> Result<()> {
    let base = node_url(&args.client)?;
    let mut view: TaskView = get_json(&base, &format!("/api/v1/tasks/{}", args.id))?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("task     {}", view.task);
    println!("state    {}", view.state);
    println!("model    {}", view.model);
    println!("shards   {}/{} done", view.shards_done, view.shards);
    if let Some(e) = view.error.take() {
        println!("error    {e}");
    }
    if let Some(route) = &view.route {
        let d = &route.decision;
        println!("routed   {} in {:.1} ms: {}", d.model, d.overhead_ms, d.reason);
        if let Some(f) = route.feedback {
            println!("feedback {f}");
        }
        println!();
        let rows: Vec<[String; 5]> = d
            .scores
            .iter()
            .map(|s| {
                [
                    s.model.clone(),
                    format!("{:.3}", s.quality),
                    format!("{:.2}", s.cost),
                    format!("{:.3}", s.utility),
                    format!("{:.1}", s.evidence),
                ]
            })
            .collect();
        print_table(&["CANDIDATE", "QUALITY", "COST", "UTILITY", "EVIDENCE"], &rows);
    }
    let rows: Vec<[String; 2]> = view
        .executors
        .iter()
        .enumerate()
        .map(|(i, e)| [i.to_string(), e.clone().unwrap_or_else(|| "(open)".into())])
        .collect();
    println!();
    print_table(&["SHARD", "EXECUTOR"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(done: usize, shards: usize, working: usize) -> TaskView {
        TaskView {
            task: "t".into(),
            state: "running".into(),
            shards,
            shards_done: done,
            executors: Vec::new(),
            error: None,
            embeddings: None,
            generations: None,
            receipt: None,
            model: String::new(),
            input_tokens: 0,
            peers_working: working,
            auction_ms: Vec::new(),
            route: None,
            ensemble: None,
            pipeline: None,
            search: None,
            classify: None,
        }
    }

    /// A staged receipt (here one empty stage) verifies offline; the same
    /// bytes with a stage signed by someone else do not.
    #[test]
    fn verify_checks_a_staged_receipt_tree() {
        use mycel_protocol::{Digest, Keypair, TaskId, merkle, spot};
        let dir = tempfile::tempdir().unwrap();
        let empty = ShardOutput::Embeddings { dimensions: 0, values: Vec::new() };
        let stage = |key: &Keypair| {
            let receipt = Receipt {
                task: TaskId([2; 16]),
                spec: Digest::of(b"spec"),
                model: Digest::of(b"model"),
                shards: Vec::new(),
                root: merkle::root(&[]),
                output: empty.digest().unwrap(),
                completed_ms: 1,
                spot: spot::Reveal { secret: [1; 32], permille: 0 },
            };
            Signed::sign(key, &receipt).unwrap()
        };
        let (requester, other) = (Keypair::from_secret_bytes(&[1; 32]), Keypair::from_secret_bytes(&[2; 32]));
        let write = |stages: Vec<Signed<Receipt>>| {
            let tree = StagedReceipt { task: TaskId([3; 16]), stages, output: empty.digest().unwrap() };
            let path = dir.path().join("staged.receipt");
            std::fs::write(&path, Signed::sign(&requester, &tree).unwrap().encode().unwrap()).unwrap();
            VerifyArgs { receipt: path, result: None }
        };
        verify(write(vec![stage(&requester)])).unwrap();
        let err = verify(write(vec![stage(&other)])).unwrap_err();
        assert!(format!("{err:#}").contains("signed by another node"), "{err:#}");
    }

    #[test]
    fn the_progress_line_shows_shards_peers_and_eta() {
        let line = progress_line("3f2a9c1e00", &view(5, 20, 4), Duration::from_secs(10));
        assert_eq!(line, "3f2a9c1e [#####...............] 5/20 shards | 4 peers working | eta 30s");
        let line = progress_line("ab", &view(0, 0, 0), Duration::ZERO);
        assert_eq!(line, "ab [....................] 0/0 shards | 0 peers working | eta ?");
    }
}
