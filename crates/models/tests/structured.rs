//! What agents ask of a generation beyond text, with the real models: JSON
//! mode that even the 135M model cannot break, log probabilities that are
//! a distribution, and tool calls in Qwen2.5's own format.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ops::ControlFlow;

use common::models_dir;
use mycel_models::{ChatMessage, Device, Generator, LoadOptions};
use mycel_protocol::{FinishReason, GenerateParams, Generation, OutputFormat, ToolChoice};

fn smollm2() -> Generator {
    Generator::load(&models_dir().join("smollm2-135m-instruct"), &LoadOptions::default(), &Device::Cpu).unwrap()
}

fn qwen() -> Generator {
    Generator::load(&models_dir().join("qwen2.5-coder-0.5b-instruct"), &LoadOptions::default(), &Device::Cpu).unwrap()
}

fn chat(model: &Generator, text: &str, params: &GenerateParams) -> (Generation, String) {
    let prompt = model.encode(&model.chat_prompt(&[ChatMessage::user(text)]).unwrap()).unwrap();
    let mut streamed = String::new();
    let g = model
        .generate(&prompt, params, &mut |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .unwrap();
    (g, streamed)
}

#[test]
fn json_mode_always_parses_even_when_the_budget_runs_out() {
    let model = smollm2();
    let prompts = [
        "Describe a cat as JSON with its name and age.",
        "List three colours.",
        "Write a haiku about the sea.",
        "What is 2+2?",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        for (max_tokens, temperature) in [(64, 0.0), (6, 0.0), (48, 0.9), (2, 0.0)] {
            let params = GenerateParams {
                max_tokens,
                temperature,
                seed: i as u64,
                format: OutputFormat::JsonObject,
                ..GenerateParams::default()
            };
            let (g, streamed) = chat(&model, prompt, &params);
            let value: serde_json::Value = serde_json::from_str(&g.text)
                .unwrap_or_else(|e| panic!("{prompt:?} at {max_tokens} tokens: {e}: {:?}", g.text));
            assert!(value.is_object(), "{value}");
            assert!(g.tokens <= max_tokens, "{g:?}");
            assert_eq!(streamed, g.text, "the stream is the answer");
            if g.finish == FinishReason::EndOfSequence {
                assert!(g.text.trim_end().ends_with('}'), "{g:?}");
            }
        }
    }
    // A schema: its types, its required members, nothing else.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "mood": {"enum": ["happy", "sad"]}, "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "mood"],
    });
    // The smallest valid answer, {"name":"","age":0,"mood":"happy"}, is 35
    // bytes: any budget of at least that many tokens ends valid.
    for (prompt, max_tokens) in [("Describe a cat.", 48), ("Who are you?", 35), ("Hi", 36)] {
        let params = GenerateParams {
            max_tokens,
            format: OutputFormat::JsonSchema(schema.to_string()),
            ..GenerateParams::default()
        };
        let (g, _) = chat(&model, prompt, &params);
        let value: serde_json::Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {:?}", g.text));
        assert!(value["name"].is_string() && value["age"].is_i64(), "{value}");
        assert!(["happy", "sad"].contains(&value["mood"].as_str().unwrap()), "{value}");
        let known = ["name", "age", "mood", "tags"];
        assert!(value.as_object().unwrap().keys().all(|k| known.contains(&k.as_str())), "{value}");
    }
    // The same constrained answer twice, greedy: exactly equal (redundant
    // copies compare them).
    let params = GenerateParams { max_tokens: 40, format: OutputFormat::JsonObject, ..GenerateParams::default() };
    assert_eq!(chat(&model, prompts[0], &params).0, chat(&model, prompts[0], &params).0);
}

#[test]
fn logprobs_are_a_distribution_and_follow_the_greedy_choice() {
    let model = smollm2();
    let params = GenerateParams { max_tokens: 12, logprobs: Some(5), ..GenerateParams::default() };
    let (g, _) = chat(&model, "Name a colour.", &params);
    assert_eq!(g.logprobs.len(), g.tokens as usize);
    let mut text = String::new();
    for t in &g.logprobs {
        assert!(t.logprob <= 0.0 && t.logprob.is_finite(), "{t:?}");
        assert_eq!(t.top.len(), 5);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t.top[0].token, t.token);
        assert!((t.top[0].logprob - t.logprob).abs() < 1e-6);
        assert!(t.top.windows(2).all(|w| w[0].logprob >= w[1].logprob), "sorted, most likely first");
        let mass: f32 = t.top.iter().map(|a| a.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
        text.push_str(&t.token);
    }
    assert_eq!(text, g.text, "the tokens spell the answer");
    // Without the request, none (results stay small).
    let (plain, _) = chat(&model, "Name a colour.", &GenerateParams { max_tokens: 12, ..GenerateParams::default() });
    assert!(plain.logprobs.is_empty());
    assert_eq!(plain.text, g.text);
}

fn weather_tool() -> serde_json::Value {
    serde_json::json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": { "city": { "type": "string", "description": "The city" } },
                "required": ["city"],
            },
        },
    })
}

#[test]
fn qwen_calls_tools_in_its_own_format_and_smollm2_refuses_them() {
    let model = qwen();
    assert!(model.supports_tools());
    let tools = vec![weather_tool()];
    let messages = [ChatMessage::user("What is the weather like in Paris right now?")];
    let prompt = model.chat_prompt_with_tools(&messages, &tools).unwrap();
    assert!(prompt.contains("<tools>") && prompt.contains("\"name\": \"get_weather\""), "{prompt}");
    let ids = model.encode(&prompt).unwrap();
    let params = GenerateParams {
        max_tokens: 64,
        tools: tools.iter().map(ToString::to_string).collect(),
        ..GenerateParams::default()
    };
    let mut streamed = String::new();
    let g = model
        .generate(&ids, &params, &mut |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(g.tool_calls.len(), 1, "{g:?}");
    assert_eq!(g.tool_calls[0].name, "get_weather");
    let args: serde_json::Value = serde_json::from_str(&g.tool_calls[0].arguments).unwrap();
    assert_eq!(args["city"], "Paris", "{args}");
    assert!(!streamed.contains("<tool_call>"), "calls are never streamed as text: {streamed:?}");

    // The call and its result go back into the conversation; the model
    // then answers in words.
    let back = [
        messages[0].clone(),
        ChatMessage::new("assistant", "").with_calls(&g.tool_calls),
        ChatMessage::new("tool", "{\"temperature_c\": 21, \"sky\": \"sunny\"}"),
    ];
    let prompt = model.chat_prompt_with_tools(&back, &tools).unwrap();
    assert!(prompt.contains("<tool_response>"), "{prompt}");
    let answer = model.generate(&model.encode(&prompt).unwrap(), &params, &mut |_| ControlFlow::Continue(())).unwrap();
    assert!(answer.tool_calls.is_empty(), "{answer:?}");
    assert!(answer.text.contains("21"), "{answer:?}");

    // tool_choice: a call even where the model would rather talk, its
    // arguments held to the tool's parameter schema.
    for choice in [ToolChoice::Required, ToolChoice::Function("get_weather".into())] {
        let params = GenerateParams { tool_choice: choice, ..params.clone() };
        let ids = model
            .encode(&model.chat_prompt_with_tools(&[ChatMessage::user("Tell me a joke.")], &tools).unwrap())
            .unwrap();
        let g = model.generate(&ids, &params, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(g.tool_calls.len(), 1, "{g:?}");
        let args: serde_json::Value = serde_json::from_str(&g.tool_calls[0].arguments).unwrap();
        assert!(args["city"].is_string(), "{g:?}");
    }

    let small = smollm2();
    assert!(!small.supports_tools());
    let e = small.chat_prompt_with_tools(&messages, &tools).unwrap_err();
    assert!(e.to_string().contains("no format for tools"), "{e}");
}

#[test]
fn raw_prompts_are_continued_as_they_are() {
    let model = smollm2();
    let params = GenerateParams { max_tokens: 8, ..GenerateParams::default() };
    let ids = model.encode("The capital of France is").unwrap();
    let g = model.generate(&ids, &params, &mut |_| ControlFlow::Continue(())).unwrap();
    assert!(g.text.contains("Paris"), "{g:?}");
}
