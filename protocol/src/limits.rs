//! Size caps. Every message a peer can send is checked against these before
//! decoding. Gossiped kinds stay far below gossipsub's 64 KiB frame.

/// Encoded [`crate::Advert`], gossiped.
pub const ADVERT: usize = 16 * 1024;
/// Encoded [`crate::Cfp`], direct or gossiped.
pub const CFP: usize = 16 * 1024;
/// Encoded [`crate::Bid`].
pub const BID: usize = 2 * 1024;
/// Encoded [`crate::Award`], which carries the shard inputs.
pub const AWARD: usize = 8 * 1024 * 1024;
/// Encoded [`crate::ResultClaim`].
pub const RESULT_CLAIM: usize = 1024;
/// Encoded [`crate::ShardResult`], claim plus output.
pub const SHARD_RESULT: usize = 16 * 1024 * 1024;
/// Encoded [`crate::ResultAck`].
pub const RESULT_ACK: usize = 1024;
/// Encoded [`crate::TaskSpec`]. Local only (CLI/API to the node, journal).
pub const TASK_SPEC: usize = 64 * 1024 * 1024;
/// Encoded [`crate::Receipt`].
pub const RECEIPT: usize = 32 * 1024 * 1024;
/// Encoded [`crate::rpc::Request`].
pub const RPC_REQUEST: usize = SHARD_RESULT + 4096;
/// Encoded [`crate::rpc::Response`].
pub const RPC_RESPONSE: usize = 4 * 1024 * 1024;
/// Adverts one sync response may carry (a node's view of the swarm; at
/// internet scale, peers are found through the DHT instead).
pub const ADVERTS_PER_SYNC: usize = 256;
/// The largest of all of the above.
pub const LARGEST_MESSAGE: usize = TASK_SPEC;

/// Short human-readable strings (model ids, CPU names, SIMD flags...).
pub const SHORT_STRING: usize = 256;
/// Models one advert may list.
pub const MODELS_PER_ADVERT: usize = 32;
/// Router outcomes one share may carry.
pub const ROUTER_OUTCOMES: usize = 2048;
/// Widest prompt embedding a shared outcome may carry.
pub const ROUTER_DIMENSIONS: usize = 1024;
/// Largest encoded share of router outcomes, in bytes: the most outcomes
/// at the widest vectors, with room for their framing.
pub const ROUTER_SHARE: usize = ROUTER_OUTCOMES * (ROUTER_DIMENSIONS * 4 + 64) + 1024;
/// Longest model description in an advert, in bytes.
pub const PROFILE_DESCRIPTION: usize = 120;
/// Tags one model's profile may list.
pub const PROFILE_TAGS: usize = 6;
/// Longest tag, in bytes.
pub const PROFILE_TAG: usize = 24;
/// Listen addresses one advert may list.
pub const ADDRS_PER_ADVERT: usize = 16;
/// SIMD feature names one advert may list.
pub const SIMD_FEATURES: usize = 64;
/// GPUs one advert may list.
pub const GPUS_PER_ADVERT: usize = 16;
/// Shards one CFP, award or receipt batch may name.
pub const SHARDS_PER_CFP: usize = 1024;
/// Stop sequences in generation parameters.
pub const STOP_SEQUENCES: usize = 8;
/// Items (texts or prompts) in one shard.
pub const ITEMS_PER_SHARD: usize = 65_536;
/// Shards one task may have.
pub const SHARDS_PER_TASK: usize = 50_000;
/// Messages in one conversation of a chat task.
pub const CHAT_TURNS: usize = 256;
/// Bytes of text one streamed piece may carry.
pub const PARTIAL_TEXT: usize = 16 * 1024;
/// Alternatives per token a generation may report (OpenAI's cap).
pub const TOP_LOGPROBS: usize = 20;
/// Longest JSON schema an answer may be constrained to, in bytes.
pub const JSON_SCHEMA: usize = 16 * 1024;
/// Tools one chat may offer the model, and calls one answer may make.
pub const TOOLS: usize = 32;
/// Longest tool definition, in bytes.
pub const TOOL_DEFINITION: usize = 8 * 1024;
/// Tokens one generation may ask for.
pub const MAX_TOKENS: u32 = 32_768;
/// Stages one staged task may have.
pub const STAGES: usize = 16;
/// Tasks one job receipt covers (a summary's levels, an ensemble's
/// proposals, judge and synthesis).
pub const JOB_TASKS: usize = 64;
/// Copies of one shard a task may ask for.
pub const MAX_REDUNDANCY: u8 = 5;

// Numbers a peer sends that the market does arithmetic with. Bounded at
// decode, so no sum or product of them can overflow (the requester also
// adds them saturating) and none can push a deadline out of reach.

/// Most milliseconds of queued work a bid may claim (one day).
pub const MAX_QUEUE_MS: u64 = 24 * 3_600_000;
/// Fastest speed a bid or advert may claim, in units per second.
pub const MAX_UNITS_PER_S: f32 = 1.0e9;
/// Most shards a bidder may take at once.
pub const MAX_CAPACITY: u32 = 4_096;
