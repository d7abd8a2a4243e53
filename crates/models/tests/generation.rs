//! Sampling with the real model: a seed fixes the text, different seeds
//! differ, a vanishing top-p leaves only the greedy choice, and a stop
//! sequence ends the answer just before it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::ops::ControlFlow;

use common::models_dir;
use mycel_models::{ChatMessage, Device, Generator, LoadOptions};
use mycel_protocol::{FinishReason, GenerateParams};

#[test]
fn sampling_is_seeded_and_greedy_at_its_limits() {
    let path = models_dir().join("smollm2-135m-instruct");
    let model = Generator::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    let prompt = model.encode(&model.chat_prompt(&[ChatMessage::user("Tell me about the sea.")]).unwrap()).unwrap();
    let run = |params: GenerateParams| {
        params.check().unwrap();
        model.generate(&prompt, &params, &mut |_| ControlFlow::Continue(())).unwrap()
    };
    let base = GenerateParams { max_tokens: 16, ..GenerateParams::default() };
    let greedy = run(base.clone());
    assert_eq!((greedy.tokens, greedy.finish), (16, FinishReason::Length), "{greedy:?}");

    let sampled = |seed| run(GenerateParams { temperature: 1.0, seed, ..base.clone() });
    assert_eq!(sampled(7), sampled(7), "the same seed gives the same text");
    let texts: HashSet<String> = (1..=4).map(|seed| sampled(seed).text).collect();
    assert!(texts.len() > 1, "four seeds at temperature 1 gave one text: {texts:?}");

    // Nucleus sampling with a mass this small keeps only the most likely
    // token: greedy, whatever the seed and temperature.
    let nucleus = run(GenerateParams { temperature: 1.0, top_p: 1e-6, seed: 3, ..base.clone() });
    assert_eq!(nucleus.text, greedy.text);

    // A stop sequence taken from the greedy answer cuts it just before.
    let word = greedy.text.split_whitespace().nth(3).expect("a greedy answer of a few words");
    let stopped = run(GenerateParams { stop: vec![word.to_string()], ..base });
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, greedy.text[..greedy.text.find(word).unwrap()]);
}
