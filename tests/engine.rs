//! Engine behaviour on a real model (stories260K): continuous batching, preemption and prefix
//! caching give exactly the tokens a request produces alone, and every block comes back.
mod common;

use llmd::engine::{EngineCore, EngineOutput, Fault, FaultInjector, Prompt};
use llmd::{EngineConfig, Error, RequestId, SamplingParams};
use std::collections::HashMap;

fn config(num_blocks: Option<usize>) -> Option<EngineConfig> {
    let dir = common::shared_model("stories260K")?;
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(256);
    c.cache.num_blocks = num_blocks.or(Some(128));
    c.scheduler.max_num_batched_tokens = 64;
    c.scheduler.max_num_seqs = 8;
    Some(c)
}

/// Eight prompts of different lengths (token ids, so lengths are exact).
fn prompts(tok: &llmd::tokenizer::Tokenizer) -> Vec<Vec<u32>> {
    let story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, she saw a big red ball under a tree and she wanted to play with it. ";
    let ids = tok.encode(&story.repeat(3), true).unwrap();
    [3, 9, 17, 30, 41, 55, 70, 96]
        .iter()
        .map(|&n| ids[..n].to_vec())
        .collect()
}

fn params(i: usize, seeded: bool) -> SamplingParams {
    let mut p = if seeded {
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(1000 + i as u64),
            ..Default::default()
        }
    } else {
        SamplingParams::greedy()
    };
    p.max_tokens = Some(40 + 3 * i);
    p.ignore_eos = true;
    p
}

fn collect(outputs: Vec<EngineOutput>, into: &mut HashMap<RequestId, Vec<u32>>) {
    for o in outputs {
        into.entry(o.request_id.clone())
            .or_default()
            .extend(o.new_token_ids);
    }
}

fn run_alone(core: &mut EngineCore, prompt: &[u32], p: SamplingParams) -> Vec<u32> {
    let id = RequestId::from("solo");
    core.add_request(id.clone(), &Prompt::Tokens(prompt.to_vec()), p, 0)
        .unwrap();
    let mut out = HashMap::new();
    while core.has_unfinished_requests() {
        collect(core.step().unwrap(), &mut out);
    }
    out.remove(&id).unwrap_or_default()
}

/// Requests join at different steps; each must produce exactly its solo tokens.
fn staggered_matches_solo(seeded: bool, num_blocks: Option<usize>, expect_preemption: bool) {
    staggered_matches_solo_with(seeded, num_blocks, expect_preemption, false)
}

/// With `device_sampling`, the backend picks the random rows' tokens too (the CPU backend runs
/// the device kernels' reference), and request 3 asks for logprobs so its row stays on the
/// host sampler: batches mix both kinds of rows.
fn staggered_matches_solo_with(
    seeded: bool,
    num_blocks: Option<usize>,
    expect_preemption: bool,
    device_sampling: bool,
) {
    let params = |i: usize, seeded: bool| {
        let mut p = params(i, seeded);
        if device_sampling && i == 3 {
            p.logprobs = Some(2);
        }
        p
    };
    let config = |n| {
        config(n).map(|mut c| {
            c.device_sampling = Some(device_sampling);
            c
        })
    };
    let Some(cfg) = config(None) else { return };
    let mut solo_core = EngineCore::new(cfg).unwrap();
    let ps = prompts(solo_core.tokenizer());
    let solo: Vec<Vec<u32>> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| run_alone(&mut solo_core, p, params(i, seeded)))
        .collect();
    assert_eq!(solo_core.num_free_blocks(), 128);

    let mut core = EngineCore::new(config(num_blocks).unwrap()).unwrap();
    let total_blocks = core.scheduler().kv().num_total_blocks();
    let mut out = HashMap::new();
    let mut step = 0;
    let mut next = 0;
    while next < ps.len() || core.has_unfinished_requests() {
        // Request i arrives at step 3*i.
        while next < ps.len() && step >= 3 * next {
            let id = RequestId(format!("r{next}"));
            core.add_request(
                id,
                &Prompt::Tokens(ps[next].clone()),
                params(next, seeded),
                0,
            )
            .unwrap();
            next += 1;
        }
        collect(core.step().unwrap(), &mut out);
        step += 1;
    }
    for (i, want) in solo.iter().enumerate() {
        let got = &out[&RequestId(format!("r{i}"))];
        assert_eq!(
            got, want,
            "request {i} (seeded={seeded}) differs when batched"
        );
    }
    assert_eq!(
        core.scheduler().num_preemptions() > 0,
        expect_preemption,
        "preemptions: {}",
        core.scheduler().num_preemptions()
    );
    assert_eq!(core.num_free_blocks(), total_blocks, "blocks leaked");
}

#[test]
fn batched_greedy_matches_solo() {
    staggered_matches_solo(false, None, false);
}

#[test]
fn batched_seeded_sampling_matches_solo() {
    staggered_matches_solo(true, None, false);
}

#[test]
fn device_sampling_path_keeps_seeded_requests_batch_invariant() {
    staggered_matches_solo_with(true, None, false, true);
    staggered_matches_solo_with(true, Some(16), true, true);
}

#[test]
fn device_sampling_follows_the_seed() {
    // Same seed → same tokens; other seeds → other tokens (the draw really is random).
    let Some(mut cfg) = config(None) else { return };
    cfg.device_sampling = Some(true);
    let mut core = EngineCore::new(cfg).unwrap();
    let p = prompts(core.tokenizer())[2].clone();
    let seeded = |seed| SamplingParams {
        seed: Some(seed),
        temperature: 1.0,
        top_k: 50,
        ..params(0, true)
    };
    let a = run_alone(&mut core, &p, seeded(7));
    assert_eq!(run_alone(&mut core, &p, seeded(7)), a);
    let others: Vec<Vec<u32>> = (8..12)
        .map(|s| run_alone(&mut core, &p, seeded(s)))
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "four other seeds all gave {a:?}"
    );
    assert_eq!(core.num_free_blocks(), 128);
    // Proof the random rows took the backend path: the engine counts every token the backend
    // picked for a random row, and a core without device sampling picks none.
    let n = core.counters().backend_sampled_random;
    assert_eq!(n, 6 * a.len() as u64, "every token of the six runs");
    let mut host = EngineCore::new(config(None).unwrap()).unwrap();
    run_alone(&mut host, &p, seeded(7));
    assert_eq!(host.counters().backend_sampled_random, 0);
}

#[test]
fn preemption_keeps_outputs_identical() {
    // 16 blocks of 16 tokens cannot hold the eight requests (up to ~160 tokens each) at once.
    staggered_matches_solo(false, Some(16), true);
    staggered_matches_solo(true, Some(16), true);
}

#[test]
fn prefix_cache_computes_only_new_tokens() {
    let Some(cfg) = config(None) else { return };
    let mut core = EngineCore::new(cfg.clone()).unwrap();
    let tok = core.tokenizer().clone();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside. "
        .repeat(12);
    let ids = tok.encode(&text, true).unwrap();
    assert!(ids.len() >= 230, "prompt text too short: {}", ids.len());
    let prefix = &ids[..200];
    let a: Vec<u32> = [prefix, &ids[200..210]].concat();
    let b: Vec<u32> = [prefix, &ids[215..230]].concat();
    let p = SamplingParams {
        max_tokens: Some(20),
        ..SamplingParams::greedy()
    };
    run_alone(&mut core, &a, p.clone());
    let before = core.counters().prompt_tokens_computed;
    let warm = run_alone(&mut core, &b, p.clone());
    let computed = core.counters().prompt_tokens_computed - before;
    // 200 shared tokens = 12 full blocks of 16 (192 tokens) reusable.
    assert_eq!(computed as usize, b.len() - 192);
    let stats = core.scheduler().prefix_cache_stats();
    assert!(stats.hits >= 192, "{stats:?}");

    let mut cold_cfg = cfg;
    cold_cfg.cache.enable_prefix_caching = false;
    let mut cold_core = EngineCore::new(cold_cfg).unwrap();
    let cold = run_alone(&mut cold_core, &b, p);
    assert_eq!(warm, cold);
    assert_eq!(
        cold_core.counters().prompt_tokens_computed as usize,
        b.len()
    );
    assert_eq!(core.num_free_blocks(), 128);
}

#[test]
fn abort_frees_blocks_immediately() {
    let Some(cfg) = config(None) else { return };
    let mut core = EngineCore::new(cfg).unwrap();
    let ps = prompts(core.tokenizer());
    core.add_request(
        "x".into(),
        &Prompt::Tokens(ps[7].clone()),
        params(0, false),
        0,
    )
    .unwrap();
    core.step().unwrap();
    assert!(core.num_free_blocks() < 128);
    assert!(core.abort_request(&"x".into()));
    assert_eq!(core.num_free_blocks(), 128);
    assert!(!core.has_unfinished_requests());
    assert!(!core.abort_request(&"x".into()));
}

#[test]
fn bad_requests_get_typed_errors() {
    let Some(cfg) = config(None) else { return };
    let mut core = EngineCore::new(cfg).unwrap();
    let g = SamplingParams::greedy;
    let long = Prompt::Tokens(vec![5; 300]);
    assert!(matches!(
        core.add_request("a".into(), &long, g(), 0),
        Err(Error::PromptTooLong {
            prompt_len: 300,
            max_model_len: 256,
            ..
        })
    ));
    let fits_but_not_with_output = Prompt::Tokens(vec![5; 250]);
    let p = SamplingParams {
        max_tokens: Some(10),
        ..g()
    };
    assert!(matches!(
        core.add_request("a".into(), &fits_but_not_with_output, p, 0),
        Err(Error::PromptTooLong { needed: 260, .. })
    ));
    assert!(matches!(
        core.add_request("a".into(), &Prompt::Tokens(vec![]), g(), 0),
        Err(Error::EmptyPrompt)
    ));
    assert!(matches!(
        core.add_request("a".into(), &Prompt::Tokens(vec![1, 512]), g(), 0),
        Err(Error::TokenOutOfVocab {
            token: 512,
            vocab_size: 512
        })
    ));
    let bad = SamplingParams {
        top_p: 0.0,
        ..Default::default()
    };
    assert!(matches!(
        core.add_request("a".into(), &Prompt::Tokens(vec![1, 2]), bad, 0),
        Err(Error::Sampling(_))
    ));
    core.add_request("a".into(), &Prompt::Tokens(vec![1, 2]), g(), 0)
        .unwrap();
    assert!(matches!(
        core.add_request("a".into(), &Prompt::Tokens(vec![1, 2]), g(), 0),
        Err(Error::DuplicateRequest(_))
    ));
    core.abort_request(&"a".into());
    assert_eq!(core.num_free_blocks(), 128);
    assert!(!core.has_unfinished_requests());
}

#[test]
fn threaded_engine_streams_and_generates() {
    let Some(cfg) = config(None) else { return };
    let engine = llmd::Engine::new(cfg.clone()).unwrap();
    let p = SamplingParams {
        max_tokens: Some(30),
        ..SamplingParams::greedy()
    };
    let outs = engine
        .generate(vec!["Once upon a time".into(), "Lily saw a dog".into()], &p)
        .unwrap();
    assert_eq!(outs.len(), 2);
    let tok = engine.tokenizer().clone();
    for (o, text) in outs.iter().zip(["Once upon a time", "Lily saw a dog"]) {
        assert!(!o.token_ids.is_empty());
        // Streamed text deltas join to the detokenized continuation of the prompt (no stop
        // strings here): decode(prompt + output) minus decode(prompt), as vLLM streams it.
        let prompt = tok.encode(text, true).unwrap();
        let eos = tok.eos_token_ids();
        let visible: Vec<u32> = o
            .token_ids
            .iter()
            .copied()
            .filter(|t| !eos.contains(t))
            .collect();
        let full = tok
            .decode(&[prompt.clone(), visible].concat(), true)
            .unwrap();
        let head = tok.decode(&prompt, true).unwrap();
        assert_eq!(Some(o.text.as_str()), full.strip_prefix(head.as_str()));
    }
    // Same prompt on the synchronous core gives the same tokens.
    let mut core = EngineCore::new(cfg).unwrap();
    let ids = core.tokenize(&"Once upon a time".into()).unwrap();
    assert_eq!(run_alone(&mut core, &ids, p.clone()), outs[0].token_ids);

    // Dropping a handle mid-stream aborts the request and frees its blocks.
    let mut h = engine
        .add_request(
            "Once upon a time".into(),
            SamplingParams {
                max_tokens: Some(200),
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
        )
        .unwrap();
    h.next_blocking().unwrap().unwrap();
    drop(h);
    let mut free = 0;
    for _ in 0..200 {
        let s = engine.stats();
        free = s.num_free_blocks;
        if free == s.num_total_blocks && s.num_running == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(free, 128);

    // Prompt errors are found while tokenizing, on the caller's thread; the engine's own
    // refusals arrive through the handle.
    assert!(matches!(
        engine.add_request(Prompt::Tokens(vec![]), SamplingParams::greedy()),
        Err(Error::EmptyPrompt)
    ));
    let bad = SamplingParams {
        top_p: 0.0,
        ..Default::default()
    };
    let h = engine.add_request("Once".into(), bad).unwrap();
    assert!(matches!(h.collect(), Err(Error::Sampling(_))));
}

#[test]
fn stop_strings_end_the_request_in_the_engine_too() {
    // Stop strings are matched by the handle, off the engine thread; the engine must still
    // stop the request and free its blocks.
    let Some(cfg) = config(None) else { return };
    let engine = llmd::Engine::new(cfg).unwrap();
    let long = SamplingParams {
        max_tokens: Some(60),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let full = engine
        .generate(vec!["Once upon a time".into()], &long)
        .unwrap()
        .remove(0);
    // A stop string from the middle of the greedy text; the text ends where it first occurs.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 40, "{:?}", full.text);
    let stop: String = chars[30..37].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let stopped = engine
        .generate(
            vec!["Once upon a time".into()],
            &SamplingParams {
                stop: vec![stop.clone()],
                ..long.clone()
            },
        )
        .unwrap()
        .remove(0);
    assert_eq!(stopped.text, full.text[..cut], "stop {stop:?}");
    assert_eq!(stopped.finish_reason, llmd::FinishReason::Stop);
    assert!(stopped.token_ids.len() < 60);
    let mut s = engine.stats();
    for _ in 0..200 {
        s = engine.stats();
        if s.num_running == 0 && s.num_free_blocks == s.num_total_blocks {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!((s.num_running, s.num_free_blocks), (0, 128));
}

/// A prompt of `n` tokens from the story text.
fn story_tokens(tok: &llmd::tokenizer::Tokenizer, n: usize) -> Vec<u32> {
    let story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. ";
    let ids = tok.encode(&story.repeat(8), true).unwrap();
    assert!(ids.len() >= n, "story too short: {}", ids.len());
    ids[..n].to_vec()
}

#[test]
fn failed_step_publishes_no_blocks() {
    // A step that fails has written no KV: its blocks must not be found by the next request
    // with the same prefix, which must give the tokens of a clean run.
    let Some(cfg) = config(None) else { return };
    let mut clean = EngineCore::new(cfg.clone()).unwrap();
    let prompt = story_tokens(clean.tokenizer(), 100);
    let p = params(0, false);
    let want = run_alone(&mut clean, &prompt, p.clone());

    let faults = FaultInjector::new();
    let mut c = cfg;
    c.fault_injection = Some(faults.clone());
    let mut core = EngineCore::new(c).unwrap();

    // The whole prompt's step fails (the budget is 64 tokens: the first chunk's step).
    core.add_request("x".into(), &Prompt::Tokens(prompt.clone()), p.clone(), 0)
        .unwrap();
    faults.fail_next(Fault::Error);
    assert!(core.step().is_err());
    assert!(
        !core.has_unfinished_requests(),
        "the step's request is aborted"
    );
    assert_eq!(core.num_free_blocks(), 128);
    let before = core.counters().prompt_tokens_computed;
    assert_eq!(run_alone(&mut core, &prompt, p.clone()), want);
    assert_eq!(
        core.counters().prompt_tokens_computed - before,
        100,
        "no block of the failed step may be reused"
    );

    // A chunked prefill whose second chunk fails: the first chunk's 4 blocks were written and
    // may be reused, the rest may not.
    let mut core = {
        let faults = FaultInjector::new();
        let mut c = config(None).unwrap();
        c.fault_injection = Some(faults.clone());
        let mut core = EngineCore::new(c).unwrap();
        core.add_request("y".into(), &Prompt::Tokens(prompt.clone()), p.clone(), 0)
            .unwrap();
        core.step().unwrap();
        faults.fail_next(Fault::Error);
        assert!(core.step().is_err());
        assert_eq!(core.counters().failed_steps, 1);
        core
    };
    let before = core.counters().prompt_tokens_computed;
    assert_eq!(run_alone(&mut core, &prompt, p), want);
    assert_eq!(core.counters().prompt_tokens_computed - before, 100 - 64);
    assert_eq!(core.num_free_blocks(), 128);
}

#[test]
fn dead_engine_fails_every_request() {
    // A panic on the engine thread: every in-flight request gets EngineDead (never a silent
    // end that looks like success), so do later ones, and the engine reports itself dead.
    let Some(mut cfg) = config(None) else { return };
    let faults = FaultInjector::new();
    cfg.fault_injection = Some(faults.clone());
    let engine = llmd::Engine::new(cfg).unwrap();
    let long = SamplingParams {
        max_tokens: Some(200),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut streams: Vec<_> = (0..3)
        .map(|i| {
            engine
                .add_request(
                    format!("Once upon a time {i}").as_str().into(),
                    long.clone(),
                )
                .unwrap()
        })
        .collect();
    for h in &mut streams {
        h.next_blocking().unwrap().unwrap();
    }
    let joined = engine.add_request("Lily".into(), long.clone()).unwrap();
    assert!(engine.dead_reason().is_none());
    faults.fail_next(Fault::Panic);
    for mut h in streams {
        let err = loop {
            match h.next_blocking() {
                Some(Ok(o)) => assert!(!o.finished(), "finished before the panic"),
                Some(Err(e)) => break e,
                None => panic!("the stream ended without an error"),
            }
        };
        assert!(matches!(err, Error::EngineDead { .. }), "{err}");
        assert!(h.next_blocking().is_none());
    }
    assert!(matches!(joined.collect(), Err(Error::EngineDead { .. })));
    let reason = engine.dead_reason().expect("dead");
    assert!(reason.contains("injected panic"), "{reason}");
    assert!(matches!(
        engine.add_request("x".into(), long),
        Err(Error::EngineDead { .. })
    ));
}

#[test]
fn full_command_channel_makes_adders_wait() {
    // The engine is stalled in a step; with a command channel of 2, a thread adding requests
    // gets at most 2 queued (plus the one the engine took), then waits instead of growing the
    // queue; once the engine runs again every request completes.
    let Some(mut cfg) = config(None) else { return };
    let faults = FaultInjector::new();
    cfg.fault_injection = Some(faults.clone());
    let engine = std::sync::Arc::new(llmd::Engine::from_core_with_capacity(
        EngineCore::new(cfg).unwrap(),
        2,
    ));
    let p = SamplingParams {
        max_tokens: Some(4),
        ..SamplingParams::greedy()
    };
    faults.fail_next(Fault::Stall(std::time::Duration::from_secs(2)));
    let first = engine.add_request("Once".into(), p.clone()).unwrap();
    // Wait until the engine is inside the stalled step.
    while faults.steps() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let added = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let adder = {
        let (engine, added, p) = (engine.clone(), added.clone(), p.clone());
        std::thread::spawn(move || {
            (0..10)
                .map(|i| {
                    let h = engine
                        .add_request(format!("Lily {i}").as_str().into(), p.clone())
                        .unwrap();
                    added.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    h
                })
                .collect::<Vec<_>>()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during_stall = added.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        during_stall <= 2,
        "{during_stall} adds passed a full channel of 2"
    );
    let handles = adder.join().unwrap();
    assert_eq!(first.collect().unwrap().token_ids.len(), 4);
    for h in handles {
        assert_eq!(h.collect().unwrap().token_ids.len(), 4);
    }
}

#[test]
fn device_argmax_path_matches_the_logits_path() {
    // Plain greedy rows take the backend's argmax (no logits to the host); asking for logprobs
    // forces the full logits path. Both must pick the same tokens.
    let Some(cfg) = config(None) else { return };
    let mut core = EngineCore::new(cfg).unwrap();
    let tok = core.tokenizer().clone();
    for p in prompts(&tok) {
        let plain = run_alone(&mut core, &p, params(0, false));
        let with_logprobs = SamplingParams {
            logprobs: Some(0),
            ..params(0, false)
        };
        assert_eq!(run_alone(&mut core, &p, with_logprobs), plain);
    }
    assert_eq!(
        core.scheduler().kv().num_free_blocks(),
        core.scheduler().kv().num_total_blocks()
    );
}

/// The step-time counters behind `gpu_decode`'s host/device split: wall time per step covers
/// the model call, and the CPU backend reports no device time.
#[test]
fn step_time_counters_cover_the_model_call() {
    let Some(c) = config(None) else { return };
    let mut core = EngineCore::new(c).unwrap();
    let p = SamplingParams {
        max_tokens: Some(8),
        ..SamplingParams::greedy()
    };
    core.add_request(
        RequestId::from("t"),
        &Prompt::Text("Once upon a time".into()),
        p,
        0,
    )
    .unwrap();
    while core.has_unfinished_requests() {
        core.step().unwrap();
    }
    let k = core.counters();
    assert!(k.steps > 0);
    assert!(k.model_ns > 0 && k.step_ns >= k.model_ns, "{k:?}");
    assert_eq!(k.device_ns, 0, "the CPU backend has no device clock");
}
