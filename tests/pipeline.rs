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

    // Bad requests are clear 4xx.
    let code = |body: Value| match search(&api, &body) {
        Err(ureq::Error::StatusCode(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(json!({"corpus": [], "query": "x"})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": " "})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": "x", "top": 0})), 400);
    assert_eq!(code(json!({"corpus": ["a"], "query": "x", "model": "no-such-model"})), 404);
}
