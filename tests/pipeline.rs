//! Pipelines over the swarm: corpus search.

use serde_json::{Value, json};

use crate::support::mycel;
use crate::testnet::{Guard, up_with_models};

fn search(api: &str, body: &Value) -> Result<Value, ureq::Error> {
    ureq::post(&format!("{api}/api/v1/search")).send_json(body)?.into_body().read_json()
}

#[test]
fn search_embeds_a_corpus_once_and_then_only_each_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let manifest = up_with_models(&dir, 2, &["all-minilm-l6-v2"]);
    let _guard = Guard(&dir);
    let api = manifest.nodes[0].api.clone();
    let mut corpus: Vec<String> = (0..300)
        .map(|i| format!("Note {i}: {}", ["the harvest was late", "a ship left port", "rain fell all week"][i % 3]))
        .collect();
    corpus[137] = "The Eiffel Tower is a wrought-iron tower in Paris.".into();
    corpus[42] = "Photosynthesis turns light into chemical energy in plants.".into();
    let file = tmp.path().join("corpus.txt");
    std::fs::write(&file, corpus.join("\n")).unwrap();

    // The first query embeds the corpus (300 distinct lines) and the query
    // through the swarm.
    let started = std::time::Instant::now();
    let first = loop {
        match search(&api, &json!({"corpus": corpus, "query": "Which famous tower stands in Paris?", "top": 3})) {
            Ok(r) => break r,
            // Models still loading: no embedding model in the swarm yet.
            Err(ureq::Error::StatusCode(503)) if started.elapsed().as_secs() < 120 => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(first["hits"][0]["index"], 137, "{first:#}");
    assert_eq!(first["hits"].as_array().unwrap().len(), 3);
    assert_eq!((first["embedded"].as_u64(), first["cached"].as_u64()), (Some(301), Some(0)), "{first:#}");
    let task = first["tasks"][0].as_str().unwrap();
    let view: Value = ureq::get(&format!("{api}/api/v1/tasks/{task}")).call().unwrap().into_body().read_json().unwrap();
    assert!(view["receipt"].as_str().is_some_and(|r| !r.is_empty()), "the embedding stage is receipted");

    // The second costs one embedding: the query.
    let out = mycel()
        .args(["submit", "search", "--node", &api, "--json", "--top", "1", "--query", "How do plants use sunlight?"])
        .arg("--corpus")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(second["hits"][0]["index"], 42, "{second:#}");
    assert_eq!((second["embedded"].as_u64(), second["cached"].as_u64()), (Some(1), Some(300)), "{second:#}");

    // As a job (what the CLI asks for, to show a progress bar): answered at
    // once with an id, the embedding task's progress shown as the job's,
    // the answer in the job's view when it is done.
    let mut more = corpus.clone();
    more.extend((0..60).map(|i| format!("Extra line {i}: the tide came in over the sand")));
    let body = json!({"corpus": more, "query": "Which famous tower stands in Paris?", "top": 2});
    let response =
        ureq::post(&format!("{api}/api/v1/search")).header("prefer", "respond-async").send_json(&body).unwrap();
    assert_eq!(response.status(), 202);
    let job: Value = response.into_body().read_json().unwrap();
    let job = job["task"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let view = loop {
        let view: Value =
            ureq::get(&format!("{api}/api/v1/tasks/{job}")).call().unwrap().into_body().read_json().unwrap();
        if view["state"] != "running" {
            break view;
        }
        assert!(started.elapsed().as_secs() < 120, "the search job never ended: {view:#}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(view["state"], "done", "{view:#}");
    assert_eq!(view["search"]["hits"][0]["index"], 137, "{view:#}");
    assert_eq!(
        (view["search"]["embedded"].as_u64(), view["search"]["cached"].as_u64()),
        (Some(60), Some(301)),
        "the query was asked before"
    );
    let shards = view["shards"].as_u64().unwrap();
    assert!(shards >= 1 && view["shards_done"].as_u64() == Some(shards), "the embedding's progress: {view:#}");

    // Bad requests are clear 4xx.
    let code = |body: Value| match search(&api, &body) {
        Err(ureq::Error::StatusCode(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(json!({"corpus": [], "query": "x"})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": " "})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": "x", "top": 0})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": "x", "model": "no-such-model"})), 404);

    // Classification from the same embedder: zero-shot against label
    // descriptions, then a head trained on examples.
    let inputs = tmp.path().join("inputs.txt");
    std::fs::write(
        &inputs,
        "The striker scored twice in the cup final.\nWhisk the eggs, then fold in the flour.\nHeavy rain and gales are expected tomorrow.\n",
    )
    .unwrap();
    let labels = "sports: a football match with players scoring goals,cooking: a recipe with ingredients and cooking steps,weather: a weather forecast of rain or sunshine";
    let classify = |extra: &[&str]| -> Vec<Value> {
        let out = mycel()
            .args(["submit", "classify", "--node", &api, "--labels", labels, "--input"])
            .arg(&inputs)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let labelled = |p: &[Value]| p.iter().map(|p| p["label"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(labelled(&classify(&[])), ["sports", "cooking", "weather"]);
    let train = tmp.path().join("train.jsonl");
    let examples: Vec<String> = [
        ("The match went to penalties.", "sports"),
        ("She ran the marathon in three hours.", "sports"),
        ("The team won the league title.", "sports"),
        ("Simmer the sauce for ten minutes.", "cooking"),
        ("Bake the bread until golden.", "cooking"),
        ("Season the soup with salt and pepper.", "cooking"),
        ("Sunny spells with a light breeze.", "weather"),
        ("Snow is forecast for the hills.", "weather"),
        ("Expect thunderstorms in the afternoon.", "weather"),
        ("The goalkeeper saved a late shot.", "sports"),
    ]
    .iter()
    .map(|(text, label)| json!({"text": text, "label": label}).to_string())
    .collect();
    std::fs::write(&train, examples.join("\n")).unwrap();
    let trained = classify(&["--train", train.to_str().unwrap()]);
    assert_eq!(labelled(&trained), ["sports", "cooking", "weather"]);
    assert!(trained.iter().all(|p| p["score"].as_f64().unwrap() > 0.34), "probabilities: {trained:?}");
    let bad = json!({"inputs": ["x"], "labels": ["a", "b"], "train": [{"text": "y", "label": "c"}]});
    let status = match ureq::post(&format!("{api}/api/v1/classify")).send_json(&bad) {
        Err(ureq::Error::StatusCode(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(status, 400, "an example with an unknown label");
}

#[test]
fn summarize_maps_chunks_across_peers_then_reduces_level_by_level() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let manifest = up_with_models(&dir, 2, &["smollm2-135m-instruct"]);
    let _guard = Guard(&dir);
    let api = manifest.nodes[0].api.clone();
    let places = ["the harbour", "the old mill", "the northern pass", "the market square", "the lighthouse"];
    let paragraphs: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "In chapter {i}, Captain Mira walked to {}. She met a farmer who told her about the storm. \
                 They agreed to repair the boat before the winter came, and she wrote it all in her log.",
                places[i % places.len()]
            )
        })
        .collect();
    let file = tmp.path().join("story.txt");
    std::fs::write(&file, paragraphs.join("\n\n")).unwrap();
    let out = tmp.path().join("summary.jsonl");
    let started = std::time::Instant::now();
    let run = loop {
        let run = mycel()
            .args(["submit", "summarize", "--node", &api, "--chunk-chars", "400", "--input"])
            .arg(&file)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        // Models still loading: no generation model in the swarm yet.
        if !run.status.success() && stderr.contains("503") && started.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            continue;
        }
        break run;
    };
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let summary: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    assert!(summary["text"].as_str().is_some_and(|t| t.len() > 20), "{summary:#}");
    // 10 paragraphs of ~190 characters in chunks of 400: 5 chunks, then 2
    // combined summaries, then 1.
    for i in 0..3 {
        let receipt = tmp.path().join(format!("summary.jsonl.stage-{i}.receipt"));
        assert!(receipt.exists(), "stage {i} receipt missing: {stderr}");
        let verify = mycel().arg("verify").arg(&receipt).output().unwrap();
        assert!(String::from_utf8_lossy(&verify.stdout).contains("ok: receipt"), "{verify:?}");
    }
    assert!(!tmp.path().join("summary.jsonl.stage-3.receipt").exists(), "{stderr}");
    // One receipt over the whole job: the three levels' receipts, and the
    // summary as the last level's executor signed it.
    let verify = mycel().arg("verify").arg(tmp.path().join("summary.jsonl.receipt")).output().unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{said}{}", String::from_utf8_lossy(&verify.stderr));
    assert!(said.contains("summary.jsonl is the answer"), "{said}");
    assert!(said.contains("ok: receipt for summarize job") && said.contains("3 tasks"), "{said}");
    let forged = tmp.path().join("forged.jsonl");
    let mut changed = summary.clone();
    changed["text"] = json!("Nothing happened in this story.");
    std::fs::write(&forged, format!("{changed}\n")).unwrap();
    let refused = mycel()
        .arg("verify")
        .arg(tmp.path().join("summary.jsonl.receipt"))
        .arg("--result")
        .arg(&forged)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a changed summary must not verify");

    let code = |body: Value| match ureq::post(&format!("{api}/api/v1/summarize")).send_json(&body) {
        Err(ureq::Error::StatusCode(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(json!({"text": "  "})), 400);
    assert_eq!(code(json!({"text": "a story", "fan_in": 1})), 400);
    assert_eq!(code(json!({"text": "a story", "colour": "red"})), 400);
}
