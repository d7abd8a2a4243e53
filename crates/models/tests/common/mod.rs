//! Where the model tests find the real models.

use std::path::PathBuf;

/// The test models: `$MYCEL_TEST_MODELS`, else `target/test-models`
/// (`scripts/test.sh` fetches them there).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MYCEL_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-models"));
    assert!(
        ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
            .iter()
            .all(|m| dir.join(m).is_dir()),
        "models missing in {}: run scripts/test.sh, or `mycel models fetch --dir {}`",
        dir.display(),
        dir.display()
    );
    dir
}
