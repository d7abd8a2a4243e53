//! `mycel/auto`: the requester picks the model per request, says why, and
//! learns from feedback.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::mycel;
use crate::testnet::{Guard, peers_seen_by, up_with_models};

fn chat(api: &str, prompt: &str) -> Value {
    let body = json!({
        "model": "mycel/auto", "max_tokens": 12,
        "messages": [{"role": "user", "content": prompt}],
    });
    ureq::post(&format!("{api}/v1/chat/completions")).send_json(&body).unwrap().into_body().read_json().unwrap()
}

/// The task behind an OpenAI answer (its id is `chatcmpl-TASK`).
fn task_of(answer: &Value) -> String {
    answer["id"].as_str().unwrap().trim_start_matches("chatcmpl-").to_string()
}

fn task(api: &str, id: &str) -> Value {
    ureq::get(&format!("{api}/api/v1/tasks/{id}")).call().unwrap().into_body().read_json().unwrap()
}

fn feedback(api: &str, id: &str, score: f64) -> Result<Value, ureq::Error> {
    ureq::post(&format!("{api}/api/v1/tasks/{id}/feedback"))
        .send_json(json!({ "score": score }))?
        .into_body()
        .read_json()
}

#[test]
fn auto_routes_by_profile_then_learns_from_feedback() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    // The requester embeds prompts (paraphrase-MiniLM-L3) and serves the
    // small chat model; its peer serves the code model.
    let manifest = up_with_models(
        &dir,
        2,
        &["paraphrase-minilm-l3-v2,smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct"],
    );
    let _guard = Guard(&dir);
    let api = manifest.nodes[0].api.clone();
    let started = Instant::now();
    while peers_seen_by(&manifest.nodes[0]).as_array().into_iter().flatten().all(|p| p["models"].as_array().is_none_or(Vec::is_empty))
        || ureq::get(&format!("{api}/api/v1/status")).call().unwrap().into_body().read_json::<Value>().unwrap()["models"]
            .as_array()
            .is_none_or(Vec::is_empty)
    {
        assert!(started.elapsed() < Duration::from_secs(180), "models not served in time");
        std::thread::sleep(Duration::from_millis(300));
    }

    // From the profiles alone: code to the code model, small talk to the
    // small model. The answer names the model that gave it.
    let code = "Write a Python function that returns the largest item of a list.";
    let answer = chat(&api, code);
    assert_eq!(answer["model"], "qwen2.5-coder-0.5b-instruct", "{answer:#}");
    let code_task = task_of(&answer);
    let view = task(&api, &code_task);
    let route = &view["route"]["decision"];
    assert_eq!(route["model"], "qwen2.5-coder-0.5b-instruct");
    assert_eq!(route["scores"].as_array().unwrap().len(), 2, "both candidates scored: {route:#}");
    assert!(route["reason"].as_str().unwrap().contains("profile"), "{route:#}");
    assert!(route["overhead_ms"].as_f64().unwrap() > 0.0);
    let answer = chat(&api, "Hi there! How are you doing today?");
    assert_eq!(answer["model"], "smollm2-135m-instruct", "{answer:#}");

    // The user says the code model's answers to this kind of prompt are
    // bad: the router moves to the other model, and keeps it there once
    // that one's answers are rated good.
    assert!(feedback(&api, &code_task, 0.0).is_ok());
    let mut moved = false;
    let mut last = code_task.clone();
    for _ in 0..4 {
        let answer = chat(&api, code);
        let id = task_of(&answer);
        last = id.clone();
        if answer["model"] == "smollm2-135m-instruct" {
            moved = true;
            feedback(&api, &id, 1.0).unwrap();
            break;
        }
        feedback(&api, &id, 0.0).unwrap();
    }
    assert!(moved, "feedback never moved the choice: {:#}", task(&api, &last)["route"]);
    let answer = chat(&api, code);
    assert_eq!(answer["model"], "smollm2-135m-instruct");
    let route = &task(&api, &task_of(&answer))["route"]["decision"];
    assert!(route["scores"][0]["evidence"].as_f64().unwrap() > 0.5, "learned, not guessed: {route:#}");

    // Bad feedback is refused clearly and changes nothing.
    assert!(matches!(feedback(&api, &code_task, 2.0), Err(ureq::Error::StatusCode(400))));
    assert!(matches!(feedback(&api, "00000000000000000000000000000000", 1.0), Err(ureq::Error::StatusCode(404))));
    // The CLI shows the decision.
    let out = mycel().args(["task", &code_task, "--node", &api]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("routed") && text.contains("CANDIDATE") && text.contains("feedback 0"), "{text}");
    // Routing time is a metric.
    let metrics = ureq::get(&format!("{api}/metrics")).call().unwrap().into_body().read_to_string().unwrap();
    assert!(metrics.contains("mycel_route_seconds_count"), "{metrics}");
}
