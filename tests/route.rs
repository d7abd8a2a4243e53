//! `mycel/auto`: the requester picks the model per request, says why, and
//! learns from feedback.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::mycel;
use crate::testnet::{Guard, peers_seen_by, up_with_env, up_with_models};

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

/// Two nodes: the requester embeds prompts (paraphrase-MiniLM-L3) and
/// serves the small chat model; its peer serves the code model too (and
/// can route as well). Waits until both serve; both APIs, the requester's
/// first.
fn two_model_swarm(dir: &Path) -> (String, String) {
    let manifest = up_with_models(
        dir,
        2,
        &[
            "paraphrase-minilm-l3-v2,smollm2-135m-instruct",
            "paraphrase-minilm-l3-v2,qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct",
        ],
    );
    let api = manifest.nodes[0].api.clone();
    let started = Instant::now();
    let serving = |api: &str| {
        let status: Value = ureq::get(&format!("{api}/api/v1/status")).call().unwrap().into_body().read_json().unwrap();
        status["models"].as_array().is_some_and(|m| !m.is_empty())
    };
    while !manifest.nodes.iter().all(|n| serving(&n.api))
        || peers_seen_by(&manifest.nodes[0])
            .as_array()
            .into_iter()
            .flatten()
            .all(|p| p["models"].as_array().is_none_or(|m| m.len() < 2))
    {
        assert!(started.elapsed() < Duration::from_secs(180), "models not served in time");
        std::thread::sleep(Duration::from_millis(300));
    }
    (api, manifest.nodes[1].api.clone())
}

#[test]
fn auto_routes_by_profile_then_learns_from_feedback() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let (api, peer) = two_model_swarm(&dir);
    let _guard = Guard(&dir);

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
    // Outcomes can be taught directly (an evaluation harness does), and
    // the router says what it would choose without running anything.
    let trivia = "Which planet is known as the Red Planet?";
    for (model, score) in [("qwen2.5-coder-0.5b-instruct", 1.0), ("smollm2-135m-instruct", 0.0)] {
        for _ in 0..3 {
            let body = json!({"prompt": trivia, "model": model, "score": score});
            ureq::post(&format!("{api}/api/v1/router/outcomes")).send_json(&body).unwrap();
        }
    }
    let choose = |api: &str, w: f64| -> Value {
        let body = json!({"kind": "chat", "inputs": [], "conversations": [[{"role": "user", "content": trivia}]], "cost_weight": w});
        ureq::post(&format!("{api}/api/v1/router/choose")).send_json(&body).unwrap().into_body().read_json().unwrap()
    };
    assert_eq!(choose(&api, 0.15)["model"], "qwen2.5-coder-0.5b-instruct", "{:#}", choose(&api, 0.15));
    assert_eq!(choose(&api, 10.0)["model"], "smollm2-135m-instruct", "a high enough cost weight picks the cheap one");

    // What it learned is shared, signed: the peer's router, which knew
    // nothing of this prompt, then chooses as this one does.
    let before = choose(&peer, 0.15);
    assert!(before["reason"].as_str().unwrap().contains("profile alone"), "{before:#}");
    let share: Value =
        ureq::get(&format!("{api}/api/v1/router/export")).call().unwrap().into_body().read_json().unwrap();
    assert!(share["outcomes"].as_u64().unwrap() >= 6, "{share:#}");
    let import = |share: &Value| ureq::post(&format!("{peer}/api/v1/router/import")).send_json(share);
    let imported: Value = import(&share).unwrap().into_body().read_json().unwrap();
    assert_eq!(imported["outcomes"], share["outcomes"]);
    assert_eq!(imported["signer"], share["signer"]);
    let after = choose(&peer, 0.15);
    assert_eq!(after["model"], "qwen2.5-coder-0.5b-instruct", "{after:#}");
    assert!(after["scores"][0]["evidence"].as_f64().unwrap() > 0.5, "{after:#}");
    // A share altered on the way is refused, and changes nothing.
    let mut forged = share.clone();
    let hex = forged["signed"].as_str().unwrap().to_string();
    let flipped = if hex.ends_with('0') { "1" } else { "0" };
    forged["signed"] = json!(format!("{}{flipped}", &hex[..hex.len() - 1]));
    assert!(matches!(import(&forged), Err(ureq::Error::StatusCode(400))));
    assert!(matches!(import(&json!({"signed": "zz"})), Err(ureq::Error::StatusCode(400))));
    let teach = |body: Value| match ureq::post(&format!("{api}/api/v1/router/outcomes")).send_json(&body) {
        Ok(_) => 200,
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(teach(json!({"prompt": trivia, "model": "no-such-model", "score": 1.0})), 404);
    assert_eq!(teach(json!({"prompt": trivia, "model": "smollm2-135m-instruct", "score": 1.0, "source": "gut"})), 400);
    assert_eq!(teach(json!({"prompt": trivia, "model": "smollm2-135m-instruct", "score": -1.0})), 400);

    // Routing time is a metric.
    let metrics = ureq::get(&format!("{api}/metrics")).call().unwrap().into_body().read_to_string().unwrap();
    assert!(metrics.contains("mycel_route_seconds_count"), "{metrics}");
}

fn ask(api: &str, body: Value) -> Result<Value, ureq::Error> {
    ureq::post(&format!("{api}/v1/chat/completions")).send_json(&body)?.into_body().read_json()
}

/// What one node's router learns reaches its peers with nobody asking:
/// every node offers its own outcomes (signed) and, each round, learns the
/// new ones of one peer that routes with the same embedding model.
#[test]
fn routers_share_what_they_learn_with_their_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let models = "paraphrase-minilm-l3-v2,smollm2-135m-instruct";
    let manifest = up_with_env(&dir, 2, &[models], &[], &[("MYCEL_ROUTER_SHARE_INTERVAL", "300ms")]);
    let _guard = Guard(&dir);
    let (api, peer) = (manifest.nodes[0].api.clone(), manifest.nodes[1].api.clone());
    let prompt = "Name the longest river in Africa.";
    let choose = |api: &str| -> Value {
        let body = json!({"kind": "chat", "inputs": [], "conversations": [[{"role": "user", "content": prompt}]]});
        ureq::post(&format!("{api}/api/v1/router/choose")).send_json(&body).unwrap().into_body().read_json().unwrap()
    };
    // Both routers open once the embedder is loaded.
    let started = Instant::now();
    let before = loop {
        match ureq::post(&format!("{peer}/api/v1/router/choose"))
            .send_json(json!({"kind": "chat", "inputs": [], "conversations": [[{"role": "user", "content": prompt}]]}))
        {
            Ok(r) => break r.into_body().read_json::<Value>().unwrap(),
            Err(_) if started.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("the peer's router never opened: {e}"),
        }
    };
    assert!(before["reason"].as_str().unwrap().contains("profile alone"), "{before:#}");
    for _ in 0..3 {
        let body = json!({"prompt": prompt, "model": "smollm2-135m-instruct", "score": 1.0});
        ureq::post(&format!("{api}/api/v1/router/outcomes")).send_json(&body).unwrap();
    }
    let started = Instant::now();
    loop {
        let after = choose(&peer);
        if after["scores"][0]["evidence"].as_f64().unwrap_or(0.0) > 0.5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the peer never learned the outcomes: {after:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Learned once, however many rounds pass: its own export stays empty
    // (imports are never shared on) and the evidence does not grow.
    let evidence = choose(&peer)["scores"][0]["evidence"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(choose(&peer)["scores"][0]["evidence"].as_f64().unwrap(), evidence, "learned twice");
    // Second-hand, it counts half of what the node that saw it gives it.
    let own = choose(&api)["scores"][0]["evidence"].as_f64().unwrap();
    assert!((own / 2.0 - evidence).abs() < 1e-3, "{own} at the source, {evidence} at the peer");
}

#[test]
fn ensembles_vote_judge_and_synthesise_with_every_stage_receipted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let (api, _) = two_model_swarm(&dir);
    let _guard = Guard(&dir);
    let question = json!([{"role": "user", "content": "What is the capital of France? One word."}]);
    for (method, last_role) in [("mycel/vote", "proposals"), ("mycel/best-of", "judge"), ("mycel/moa", "synthesis")] {
        let answer = ask(&api, json!({"model": method, "n": 3, "max_tokens": 16, "messages": question})).unwrap();
        assert_eq!(answer["choices"].as_array().unwrap().len(), 1, "{method}: one answer: {answer:#}");
        let view = task(&api, &task_of(&answer));
        let e = &view["ensemble"];
        assert_eq!(view["state"], "done", "{view:#}");
        assert_eq!(e["proposals"].as_array().unwrap().len(), 3, "{method}: {e:#}");
        let stages = e["stages"].as_array().unwrap();
        // Mixture-of-agents' synthesis is judged against the first
        // proposal, unless it is that proposal word for word.
        let judged_synthesis = method == "mycel/moa" && e["verdicts"].as_array().is_some_and(|v| v.len() == 2);
        let last_role = if judged_synthesis { "judge" } else { last_role };
        assert_eq!(stages.last().unwrap()["role"], last_role, "{method}: {e:#}");
        // Every stage is a task of its own, done, with a receipt.
        for stage in stages {
            let stage_view = task(&api, stage["task"].as_str().unwrap());
            assert_eq!(stage_view["state"], "done");
            assert!(stage_view["receipt"].as_str().is_some_and(|r| !r.is_empty()), "{method}: {stage_view:#}");
        }
        // The answer names the model that wrote it.
        let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
        match e["chosen"].as_u64() {
            // The synthesis is the answer.
            None if method == "mycel/moa" => {
                let wrote = stages.iter().find(|s| s["role"] == "synthesis").expect("a synthesis stage");
                assert_eq!(answer["model"], wrote["model"], "{e:#}");
            }
            None => panic!("{method} chose no proposal: {e:#}"),
            Some(chosen) => {
                assert_eq!(e["proposals"][chosen as usize]["text"], text, "{e:#}");
                assert_eq!(answer["model"], e["proposals"][chosen as usize]["model"]);
            }
        }
        // One receipt over the whole ensemble: every stage's receipt, and the
        // answer as its executor signed it; checked offline.
        let name = method.replace('/', "-");
        let receipt = tmp.path().join(format!("{name}.receipt"));
        std::fs::write(&receipt, hex::decode(view["receipt"].as_str().unwrap()).unwrap()).unwrap();
        let verify = |answer: &Value| {
            let file = tmp.path().join(format!("{name}.answer.jsonl"));
            std::fs::write(&file, format!("{answer}\n")).unwrap();
            mycel().arg("verify").arg(&receipt).arg("--result").arg(&file).output().unwrap()
        };
        let ok = verify(&view["generations"][0]);
        let said = String::from_utf8_lossy(&ok.stdout);
        assert!(ok.status.success(), "{method}: {said}{}", String::from_utf8_lossy(&ok.stderr));
        assert!(said.contains("is the answer") && said.contains("ok: receipt for ensemble job"), "{method}: {said}");
        assert_eq!(said.matches("ok: task ").count(), stages.len(), "{method}: every stage in it: {said}");
        let mut forged = view["generations"][0].clone();
        forged["text"] = json!("Berlin, without a doubt.");
        let refused = verify(&forged);
        assert!(!refused.status.success(), "{method}: a changed answer must not verify");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("not what its executor signed"), "{refused:?}");
        if method == "mycel/vote" {
            let counted: u64 = e["votes"].as_array().unwrap().iter().map(|v| v[1].as_u64().unwrap()).sum();
            assert_eq!(counted, 3);
        }
        if method == "mycel/best-of" {
            assert_eq!(e["verdicts"].as_array().unwrap().len(), 2, "asked in both orders: {e:#}");
        }
    }
    // Bad requests are clear 4xx.
    let bad = |body: Value| match ask(&api, body) {
        Err(ureq::Error::StatusCode(code)) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(bad(json!({"model": "mycel/vote", "n": 1, "messages": question})), 400);
    assert_eq!(bad(json!({"model": "mycel/vote", "n": 9, "messages": question})), 400);
    assert_eq!(bad(json!({"model": "mycel/moa", "stream": true, "messages": question})), 400);
    let body = json!({"kind": "generate", "inputs": ["hi"], "model": "mycel/vote", "members": ["no-such-model"]});
    let status = match ureq::post(&format!("{api}/api/v1/tasks")).send_json(&body) {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status, 404, "an unknown member model");
    // Ensemble and routing settings are refused on a plain model, not ignored.
    for extra in [json!({"n": 3}), json!({"judge": "smollm2-135m-instruct"}), json!({"cost_weight": 0.5})] {
        let mut body = json!({"kind": "generate", "inputs": ["hi"], "model": "smollm2-135m-instruct"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let status = match ureq::post(&format!("{api}/api/v1/tasks")).send_json(&body) {
            Err(ureq::Error::StatusCode(code)) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(status, 400, "{body}");
    }
}
