"""The sections of a run's configuration: one dataclass per `[section]` of a TOML preset.

Each field's default is the run's default; the docstring under a field is its meaning, read
by `dilo train --help` and README's config table (dilo/config_help.py). `dilo.config` puts
them together into `Config`, parses presets and the command line, and re-exports every
section: import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dilo.options import EXCHANGE_PIECES


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Where metrics, summaries and checkpoints go."""
    seed: int = 0
    """Seed for model init (same on every worker) and data order."""
    steps: int = 1000
    """Inner steps per worker for the whole run; 0 = train until stopped (SIGTERM/Ctrl-C), LR warmup then constant (docs/continual.md)."""
    mode: str = "diloco"
    """`diloco` (outer steps every H inner steps) or `ddp` (gradient all-reduce every step)."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    threads: int = 0
    """torch intra-op threads per process; 0 = CPU cores / local processes."""
    worker_size: int = 1
    """Processes per DiLoCo worker (e.g. 8 = a node of 8 GPUs): data-parallel inside, outer exchange between workers; must divide the world size (docs/islands.md)."""
    shard: str = "ddp"
    """How a worker's run.worker_size ranks train: `ddp` (each rank holds the whole model and a full θ) or `fsdp` (torch's fully_shard over the worker's ranks: each rank holds and exchanges only its own chunk of the model, θ and outer momentum; needs run.mode = diloco; docs/islands.md, "Sharded workers")."""
    slowdown: str = ""
    """Testing aid: `worker:factor[,worker:factor]` makes those workers run `factor` times slower (each inner step is followed by a sleep of factor - 1 times its duration; "1:2" = worker 1 at half speed; docs/uneven.md)."""
    failover: str = "restart"
    """What a dead worker costs on the torch backend: `restart` (torchrun restarts every process; they resume from checkpoints) or `heal` (the survivors re-form the group and go on; a restarted worker joins the running group; needs comm.store, run.workers, run.slot; docs/elastic.md)."""
    workers: int = 0
    """run.failover = heal: the run's worker slots (the workers that start it); each worker is a process of its own."""
    slot: int = 0
    """run.failover = heal: this process's slot, 0 .. run.workers - 1 (a restarted worker keeps its slot)."""
    min_workers: int = 1
    """run.failover = heal: with fewer survivors the group does not heal; they exit and their launchers restart them (restart-the-world fallback, from checkpoints)."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    """256 for bytes; raise it for token files made with another tokenizer."""
    seq_len: int = 128
    """Context length in tokens."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    dropout: float = 0.0
    """Dropout probability inside blocks."""
    lora_rank: int = 0
    """LoRA rank r (0 = off): the base (from checkpoint.init_from) is frozen and only the adapters train and are exchanged (docs/adapters.md)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (lora_alpha / lora_rank)·B A."""
    lora_targets: str = ""
    """Comma-separated linear layers that get adapters: for dilo's GPT a subset of qkv, proj, fc, fc_out; for model.hf_config peft module names; "" = qkv,proj (GPT) or q_proj,v_proj (hf)."""
    hf_config: str = ""
    """Path to a Hugging Face transformers config.json: the model is AutoModelForCausalLM.from_config (nothing downloaded; needs the [hf] extra); model.vocab_size/seq_len still size the data, the other model.* shape keys are ignored."""


@dataclass
class DataConfig:
    path: str = ""
    """"" = embedded default (this Python's stdlib sources); else text file, folder, glob, .npy or .bin of uint16 tokens."""
    max_bytes: int = 4_000_000
    """Byte budget for text sources; 0 = no limit."""
    val_fraction: float = 0.05
    """Share of the stream held out for evaluation (every k-th 4096-token block)."""
    layout: str = "iid"
    """`iid`: training windows shuffled with run.seed (anew every epoch), so every worker's batch draws from the whole corpus; `contiguous`: worker w reads a contiguous share of the stream (files sorted by path). Held-out data is the same for both (docs/design.md)."""
    batch_size: int = 16
    """Sequences per inner step per process (a worker of run.worker_size processes reads worker_size times this)."""
    eval_batches: int = 8
    """Batches in each evaluation."""
    eval_every: int = 0
    """Evaluate every N outer steps (0 = only at the end)."""
    watch: bool = False
    """Treat data.path (a folder) as a stream: its files (text, or .npy/.bin token shards) join in name order as they appear, taken at outer-step boundaries once every worker sees them (docs/continual.md)."""
    when_idle: str = "wait"
    """With data.watch and every shard consumed: `wait` for a new file (logged) or `repeat` the shards already taken."""
    replay: float = 0.0
    """With data.watch: share of every batch's rows drawn (deterministically) from older shards, in [0, 1)."""


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=list)
    """Named held-out sets `name=path` (any data.path form), each logged as its own eval loss (field `set` in JSONL, label `set` in Prometheus). On the command line: comma-separated."""


@dataclass
class PublishConfig:
    every: int = 0
    """Publish the global model (safetensors + manifest.json) every N outer steps; 0 = never."""
    dir: str = ""
    """Where versions go (step-XXXXXX/ folders and a `latest` pointer); "" = run.dir/published."""
    keep: int = 3
    """How many published versions to keep (the newest)."""


@dataclass
class InnerConfig:
    lr: float = 4e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    warmup_steps: int = 100
    """Linear warmup steps, then cosine decay to min_lr_ratio * lr at run.steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 = no clipping."""


@dataclass
class OuterConfig:
    inner_steps: int = 500
    """H: inner steps between outer steps; 0 with outer.sync_every_seconds or outer.target_tokens (exactly one of the three ends the rounds)."""
    sync_every_seconds: float = 0.0
    """T: each round lasts T seconds from the end of the previous exchange; every worker takes the inner steps that fit and then syncs, so nobody waits for the slowest (needs outer.inner_steps = 0; docs/uneven.md)."""
    target_tokens: int = 0
    """A round ends once the workers together have trained on this many tokens in it (their counts are polled in the background; needs outer.inner_steps = 0; docs/uneven.md)."""
    weighting: str = "equal"
    """`equal` (every worker's Δ counts the same) or `tokens` (each worker's Δ weighted by the tokens it trained on in the round; needs outer.aggregate mean or clip; docs/uneven.md)."""
    lr: float = 0.7
    """Outer (Nesterov SGD) learning rate."""
    momentum: float = 0.9
    """Outer momentum."""
    nesterov: bool = True
    """Nesterov momentum for the outer step."""
    fragments: int = 1
    """P: Streaming DiLoCo fragments, strided over the transformer blocks (embeddings with
    fragment 0, final norm/head with P-1); one is exchanged every H/P steps. Must divide H."""
    delay: int = 0
    """τ: inner steps a fragment's exchange runs behind compute (pseudo-gradient taken τ
    steps before it is applied); must be < H/P. 0 = blocking (unless overlap is set)."""
    alpha: float = 0.0
    """Merge on arrival: live ← alpha·live + (1 − alpha)·θ_new; 0 = take the global, in [0, 1]."""
    overlap: str = "none"
    """`none`, `delayed` (round t's averaged Δ is applied at the end of round t+1, its exchange
    hidden behind round t+1) or `eager` (delayed, and the live model restarts from a local
    outer step that uses the fresh own Δ in place of the stale own share). With Nesterov 0.9 both
    oscillate past an outer lr bound (eager: 0.77 at 2 workers, 0.42 at 4; delayed: 0.25), and
    dilo warns: lower outer.lr or outer.momentum; it also warns within 0.85 of the bound, where the
    outer iteration is stable but barely damped (eager, 4 workers, H = 100, Nesterov 0.5: 1.05x core
    at lr 0.7, 1.03x at 0.6). Inside the bound the round of staleness still costs quality, less with
    longer rounds (eager ÷ core with 4 workers: 1.18x at H = 20, 1.05x at H = 100 at lr 0.7);
    dilo warns below outer.inner_steps 100 (docs/streaming.md)."""
    digest: str = "step"
    """When the global hash of each new state (BLAKE3 over θ and the outer momentum) is computed:
    `step` (inside the outer step, confirmed with the group before it returns) or `background` (on a
    thread while the next inner steps run, confirmed at the next outer step or when the run ends; the
    sync line and record then carry the previous state's hash, `hash_step`). Background needs
    comm.backend = torch and run.failover = restart (docs/design.md, "The global hash")."""
    lora_aggregate: str = "naive"
    """With model.lora_rank > 0: `naive` (average A and B separately: inexact), `frozen_a` (A fixed from the seed, only B trained and exchanged: exact) or `exact` (fold the residual of the mean of the B·A products into the frozen base after every outer step; docs/adapters.md)."""
    aggregate: str = "auto"
    """How each chunk's owner combines the workers' Δ: mean, trimmed_mean, median or clip
    (docs/robust.md). auto = mean with comm.backend = torch (a trusted cluster: Inf/NaN are
    dropped anyway, and mean loses nothing) and trimmed_mean with hivemind (an open swarm:
    one peer's ×1000 Δ must not move θ)."""
    trim: int = 1
    """k of trimmed_mean: per coordinate the k largest and k smallest values are dropped; a
    torch run refuses 2k >= workers, a swarm clamps k to (round size − 1) // 2."""
    clip_ratio: float = 2.0
    """r of clip: each worker's Δ is scaled down to at most r × the median of the workers' norms."""


@dataclass
class CommConfig:
    backend: str = "torch"
    """`torch` (torch.distributed under torchrun) or `hivemind` (swarm)."""
    codec: str = "int8"
    """Pseudo-gradient wire format: fp32, bf16, fp16, int8, fp4, int2 (2-bit dense) or sparse
    (top-k per block with low-bit values, always with error feedback; docs/codecs.md)."""
    block_size: int = 256
    """Elements per scale block for int8/fp4/int2."""
    error_feedback: bool = False
    """Keep what the lossy codec dropped from this worker's Δ and add it to the next one
    (e ← (Δ + e) − decode(encode(Δ + e))). Needs a lossy comm.codec; always on with sparse."""
    ef_decay: float = 1.0
    """β of error feedback: send Δ + β·e (SparseLoCo's decayed accumulator, e.g. 0.95 with
    outer.momentum 0); 1 = keep e whole. Applies when error feedback runs (else a warning)."""
    owner_feedback: bool = False
    """Two-phase codecs with error feedback (int2, fp4, int8): each chunk's owner adds M × what its
    re-encode of the mean lost to its own residual, so the exchange's second rounding is sent
    again too (docs/codecs.md). Refused where it cannot act: a lossless codec, no error feedback,
    the sparse codec's gather exchange, islands, run.mode ddp."""
    density: float = 0.02
    """comm.codec = sparse: the fraction of each block kept (top-k by magnitude), in (0, 1]."""
    value_bits: int = 2
    """comm.codec = sparse: bits per kept value (sign + magnitude code): 2, 4 or 8."""
    sparse_block: int = 4096
    """comm.codec = sparse: elements per top-k block (2 .. 65536; offsets take its bit length)."""
    sparse_exchange: str = "gather"
    """comm.codec = sparse: `gather` (every worker decodes every worker's bytes: exact, bytes grow
    with the workers) or `two_phase` (owners re-sparsify their chunk's mean: bytes flat in the
    workers; pair it with comm.owner_feedback). docs/codecs.md."""
    pieces: int = EXCHANGE_PIECES
    """Pieces per owner chunk of the two-phase exchange (1..64): piece j + 1 is encoded, summed or
    decoded while piece j is on the wire; the same bytes and θ for any value (1 = no pipelining;
    the swarm runs 1). docs/design.md."""
    timeout: float = 600.0
    """Seconds a collective may take before the worker gives up."""
    store: str = ""
    """run.failover = heal: host:port of the store that outlives every worker (`python -m dilo.rendezvous_store`); membership and process groups meet there."""
    heartbeat: float = 5.0
    """run.failover = heal: seconds without a heartbeat after which a silent worker counts as dead (a SIGSTOPped or hung one is dropped after this, not after comm.timeout)."""


@dataclass
class PeersConfig:
    """The swarm (comm.backend = hivemind): how this peer finds, admits and serves others."""

    initial: list[str] = field(default_factory=list)
    """Multiaddrs of running peers or bootstrap nodes (/ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...); empty = start a new swarm. On the command line: comma-separated."""
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    """Multiaddrs this peer listens on; tcp port 0 = any free port."""
    announce: list[str] = field(default_factory=list)
    """Multiaddrs other peers should dial (public address or forwarded port behind NAT); empty = the listen addresses."""
    key_file: str = ""
    """File holding the run key (at least 16 characters); empty = the DILO_RUN_KEY environment variable."""
    open: bool = False
    """Allow a swarm without a run key: anyone who can reach it can join it and download its weights."""
    identity_file: str = ""
    """libp2p private key file that keeps this peer's id (and so its address) across restarts; created if missing."""
    min_peers: int = 1
    """Peers that must be present before training starts (1 = start at once)."""
    heartbeat: float = 2.0
    """Seconds between this peer's membership records; a peer silent for 3 heartbeats is gone."""
    linger: float = 30.0
    """Seconds a finished peer keeps serving the final state to live peers that are still behind."""
    shard: int = -1
    """This peer's data shard in [0, num_shards); -1 = derived from its peer id (shards may then collide)."""
    num_shards: int = 16
    """Number of data shards the swarm's peers pick from."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a checkpoint every N outer steps (0 = never)."""
    keep: int = 3
    """How many checkpoints each worker keeps."""
    resume: str = ""
    """"" = start fresh (refused if run.dir holds checkpoints), `auto` = newest valid state in run.dir (fresh if there are no checkpoint files; refused, listing them, if there are some but none is valid; exact for the same world size, elastic otherwise), `fresh` = set run.dir's checkpoints aside (renamed to checkpoints.old-<time>) and start from step 0, or a step directory path."""
    init_from: str = ""
    """Start a new run from the global weights of this checkpoint file or step directory."""
    async_: bool = False
    """Copy the state to CPU at the step boundary, write it in a background thread; one write in flight, a second request waits for it."""
    on_failure: bool = True
    """When an exchange fails (a peer died or timed out), save the last consistent global state before exiting; off while every = 0."""


@dataclass
class MetricsConfig:
    port: int = 0
    """Prometheus endpoint http://metrics.host:PORT/metrics; each process serves on port + its local rank; 0 = off."""
    host: str = "127.0.0.1"
    """Address the Prometheus endpoint listens on. The default serves this machine only (the endpoint has no authentication); a Prometheus on another machine, the usual case with torchrun over several nodes, needs 0.0.0.0 or this node's address on the cluster network."""
    log_every: int = 10
    """Write an inner-step metrics line (and a progress update) every N inner steps."""
    progress: str = "auto"
    """On rank 0: `auto` (a bar on a TTY, else an INFO line every log_every steps), `on` (a bar), `off` (INFO lines)."""
