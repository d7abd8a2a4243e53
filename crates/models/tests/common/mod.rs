//! Where the model tests find the real models.

use std::path::PathBuf;

/// The test models: `$MYCEL_TEST_MODELS`, else `target/test-models`
/// (`scripts/test.sh` fetches them there).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MYCEL_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-models"));
    assert!(
        dir.join("all-minilm-l6-v2").is_dir() && dir.join("smollm2-135m-instruct").is_dir(),
        "models missing in {}: run scripts/test.sh, or `mycel models fetch --dir {}`",
        dir.display(),
        dir.display()
    );
    dir
}
