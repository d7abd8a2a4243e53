//! On an NVIDIA GPU, the CUDA backend gives what the CPU gives. Built only
//! with `--features cuda` (see scripts/build-cuda.sh); needs a GPU to run.

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::models_dir;
use mycel_models::{Device, Embedder, Generator, LoadOptions};
use mycel_protocol::GenerateParams;

#[test]
fn gpu_results_match_the_cpu() {
    let gpu = Device::new_cuda(0).expect("this test needs an NVIDIA GPU and its driver");
    let dir = models_dir();
    let texts: Vec<String> =
        (0..64).map(|i| format!("text {i}: {}", "padding differs per text ".repeat(i % 9))).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cpu = Embedder::load(&dir.join("all-minilm-l6-v2"), &Device::Cpu).unwrap().embed(&refs, 32).unwrap();
    let on_gpu = Embedder::load(&dir.join("all-minilm-l6-v2"), &gpu).unwrap().embed(&refs, 32).unwrap();
    for (a, b) in cpu.iter().zip(&on_gpu) {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(dot > 0.99999, "cosine {dot}");
    }

    let path = dir.join("smollm2-135m-instruct");
    let params = GenerateParams { max_tokens: 16, ..GenerateParams::default() };
    let run = |device: &Device| {
        let g = Generator::load(&path, &LoadOptions::default(), device).unwrap();
        let prompt = g.encode(&g.chat_prompt(&[mycel_models::ChatMessage::user("Name a colour.")]).unwrap()).unwrap();
        g.generate(&prompt, &params, &mut |_| std::ops::ControlFlow::Continue(())).unwrap()
    };
    let (c, g) = (run(&Device::Cpu), run(&gpu));
    assert_eq!(c.tokens, g.tokens);
    eprintln!("cpu: {:?}\ngpu: {:?}", c.text, g.text);
}
