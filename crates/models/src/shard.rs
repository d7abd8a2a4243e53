//! Runs one shard of a task on a local model: the executor for each kind
//! of work. The market decides what to run ([`mycel_protocol::Work`]); this
//! turns each kind into calls on the worker [`Pool`] and gives back the
//! output a claim commits to. A new kind of work adds its case here.

use std::sync::Arc;

use mycel_protocol::{GenerateParams, Generation, ShardOutput, Work};
use tokio::sync::mpsc;

use crate::{ChatMessage, Embedder, Generator, ModelError, Pool, PoolError};

/// The model a shard runs on.
#[derive(Debug, Clone)]
pub enum Model {
    /// A sentence embedder, for `embed` work.
    Embedder(Arc<Embedder>),
    /// A text generator, for `generate` and `chat` work.
    Generator(Arc<Generator>),
}

/// A shard's output, and the input tokens the model read (for usage).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRun {
    /// One entry per item, in order.
    pub output: ShardOutput,
    /// Tokens read (texts after truncation, rendered prompts).
    pub input_tokens: u64,
}

/// Why a shard could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The pool is busy or stopped.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The model failed on the input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The pool dropped the job before answering.
    #[error("the worker pool stopped")]
    Stopped,
    /// This model cannot do this kind of work.
    #[error("this model cannot run that kind of work")]
    WrongModel,
}

/// Text as a generation shard produces it: for each item (by its position
/// in the task), a receiver of its pieces, handed over as the item starts.
pub type TextStreams = mpsc::Sender<(u64, mpsc::Receiver<String>)>;

/// Runs `work` (items from `first_item` on) on `model`. With `text`, each
/// generated item's pieces are handed over as they are produced; the
/// returned output is the answer either way.
pub async fn run(
    pool: &Pool,
    model: Model,
    work: Work,
    first_item: u64,
    text: Option<TextStreams>,
) -> Result<ShardRun, ShardError> {
    match (model, work) {
        (Model::Embedder(model), Work::Embed { texts }) => {
            let embedded = pool.embed(model, texts)?.await.map_err(|_| ShardError::Stopped)??;
            let dimensions = embedded.vectors.first().map_or(0, Vec::len) as u32;
            let output = ShardOutput::Embeddings { dimensions, values: embedded.vectors.concat() };
            Ok(ShardRun { output, input_tokens: embedded.input_tokens })
        }
        (Model::Generator(model), Work::Generate { prompts, params }) => {
            let prompts = prompts
                .into_iter()
                .map(|p| model.encode(&model.chat_prompt(&[ChatMessage::user(p)])?))
                .collect::<Result<_, _>>()?;
            generate(pool, &model, prompts, &params, first_item, text).await
        }
        (Model::Generator(model), Work::Complete { prompts, params }) => {
            let prompts = prompts.iter().map(|p| model.encode(p)).collect::<Result<_, _>>()?;
            generate(pool, &model, prompts, &params, first_item, text).await
        }
        (Model::Generator(model), Work::Chat { conversations, params }) => {
            let tools = params
                .tools
                .iter()
                .map(|t| serde_json::from_str(t))
                .collect::<Result<Vec<serde_json::Value>, _>>()
                .map_err(|e| ModelError::Invalid(format!("a tool definition is not JSON: {e}")))?;
            let prompts = conversations
                .into_iter()
                .map(|turns| {
                    let messages: Vec<ChatMessage> = turns
                        .into_iter()
                        .map(|t| ChatMessage::new(t.role.as_str(), t.content).with_calls(&t.tool_calls))
                        .collect();
                    model.encode(&model.chat_prompt_with_tools(&messages, &tools)?)
                })
                .collect::<Result<_, _>>()?;
            generate(pool, &model, prompts, &params, first_item, text).await
        }
        _ => Err(ShardError::WrongModel),
    }
}

/// Generates an answer to each prompt (token ids), one after another.
async fn generate(
    pool: &Pool,
    model: &Arc<Generator>,
    prompts: Vec<Vec<u32>>,
    params: &GenerateParams,
    first_item: u64,
    text: Option<TextStreams>,
) -> Result<ShardRun, ShardError> {
    let mut answers: Vec<Generation> = Vec::with_capacity(prompts.len());
    let mut input_tokens = 0u64;
    for (i, ids) in prompts.into_iter().enumerate() {
        input_tokens += ids.len() as u64;
        let item = first_item + i as u64;
        // Each item samples with its own seed: the same prompt twice in one
        // task may differ, yet a rerun gives the same text.
        let item_params = GenerateParams { seed: params.seed.wrapping_add(item), ..params.clone() };
        let (stream, done) = pool.generate(model.clone(), ids, item_params)?;
        match &text {
            // Whoever reads the text reads it while the model runs (a reader
            // gone drops it, and the model runs on).
            Some(streams) => {
                let _ = streams.send((item, stream)).await;
            }
            // Nobody reads the pieces: dropping the receiver lets the model
            // run without waiting on it.
            None => drop(stream),
        }
        answers.push(done.await.map_err(|_| ShardError::Stopped)??);
    }
    Ok(ShardRun { output: ShardOutput::Generations(answers), input_tokens })
}
