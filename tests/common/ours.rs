//! llmd's own outputs for the reference comparisons: logits at every prompt position from one
//! prefill through the paged cache, and greedy tokens from the engine.
use llmd::backend::cpu::CpuBackend;
use llmd::backend::{BatchPlan, SeqPlan};
use llmd::engine::{EngineCore, Prompt};
use llmd::model::{Model, ModelConfig, ModelLimits};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::path::Path;

const BLOCK: usize = 16;

/// Our logits for every position of `tokens`, from one prefill through the paged cache, by a
/// model loaded for positions up to `max_positions` (the engine's `max_model_len`).
pub fn llmd_logits_all_positions(
    dir: &Path,
    tokens: &[u32],
    max_positions: usize,
) -> Vec<Vec<f32>> {
    llmd_logits_all_positions_on(CpuBackend::default(), dir, tokens, max_positions)
}

/// [`llmd_logits_all_positions`] on a CPU backend configured by the caller (e.g. int8 weights).
pub fn llmd_logits_all_positions_on(
    backend: CpuBackend,
    dir: &Path,
    tokens: &[u32],
    max_positions: usize,
) -> Vec<Vec<f32>> {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let n = tokens.len();
    let blocks = n.div_ceil(BLOCK);
    let limits = ModelLimits {
        max_tokens: n,
        max_logit_rows: n,
        max_positions: max_positions.max(n),
        num_blocks: blocks + 2,
        block_size: BLOCK,
    };
    let mut model = Model::load(backend, dir, cfg.clone(), limits, &mut |_, _| {}).unwrap();
    // Blocks in reverse physical order, so the block table really is followed.
    let table: Vec<u32> = (0..blocks as u32).rev().map(|b| b + 2).collect();
    let plan = BatchPlan {
        token_ids: tokens.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n)
            .map(|p| table[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect(),
        seqs: vec![SeqPlan {
            query_start: 0,
            query_len: n,
            context_len: n,
        }],
        num_decode_seqs: 0,
        block_tables: table.clone(),
        max_blocks_per_seq: blocks,
        logits_indices: (0..n as u32).collect(),
    };
    let mut logits = Vec::new();
    model.forward(&plan, &mut logits).unwrap();
    logits.chunks(cfg.vocab_size).map(|c| c.to_vec()).collect()
}

/// `n` greedy tokens after `prompt` from the engine (EOS ignored) with `max_model_len`.
pub fn llmd_greedy(dir: &Path, prompt: &[u32], n: usize, max_model_len: usize) -> Vec<u32> {
    llmd_greedy_with(EngineConfig::new(dir), prompt, n, max_model_len)
}

/// [`llmd_greedy`] from a config the caller set up (`c.model` the model).
pub fn llmd_greedy_with(
    mut c: EngineConfig,
    prompt: &[u32],
    n: usize,
    max_model_len: usize,
) -> Vec<u32> {
    c.cache.num_blocks = Some(max_model_len.div_ceil(BLOCK) + 4);
    c.max_model_len = Some(max_model_len);
    let mut core = EngineCore::new(c).unwrap();
    let p = SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    core.add_request(RequestId::from("g"), &Prompt::Tokens(prompt.to_vec()), p, 0)
        .unwrap();
    let mut out = vec![];
    while core.has_unfinished_requests() {
        for o in core.step().unwrap() {
            out.extend(o.new_token_ids);
        }
    }
    out
}
