//! Continuous batching: decides, every step, which requests run and how many tokens each
//! computes.
//!
//! Policy (vLLM v1's): running requests first, in admission order — a decode takes one token,
//! an unfinished prompt takes a chunk of what is left of the token budget
//! (`max_num_batched_tokens`). When the KV pool cannot give a running request its blocks, the
//! lowest-priority running request (FCFS: the latest admitted) is preempted: its blocks are freed
//! and it goes back to the front of the waiting queue, to be recomputed later (its full blocks
//! usually stay in the prefix cache, so the recompute is mostly cache hits). Waiting requests are
//! admitted while budget, `max_num_seqs` and blocks allow, and not in a step that preempted.
//!
//! Invariants: the scheduler alone owns request state; a request's `num_computed_tokens` is
//! advanced when it is scheduled (the engine runs every scheduled step or aborts its requests);
//! every request leaving (finish, abort) has its blocks freed at once.
use crate::config::{SchedulerConfig, SchedulingPolicy};
use crate::kv::connector::KvConnector;
use crate::kv::{BlockId, KvCacheManager, PrefixCacheStats};
use crate::request::{FinishReason, RequestId, RequestStatus, TokenId};
use std::collections::{HashMap, VecDeque};

/// The scheduler's view of one request.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: RequestId,
    /// Prompt then output tokens.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    pub status: RequestStatus,
    /// Lower runs first under [`SchedulingPolicy::Priority`].
    pub priority: i32,
    arrival: u64,
    /// Mixed into block hashes (e.g. LoRA name, cache salt).
    pub extra_keys: Vec<String>,
    /// Prompt tokens served from the prefix cache when first scheduled.
    pub num_cached_tokens: Option<usize>,
    /// When it was first scheduled (the end of its wait in the queue).
    pub first_scheduled: Option<std::time::Instant>,
    pub num_preemptions: usize,
    /// The tiers below the device were asked for this request's prefix (once per admission).
    kv_probed: bool,
    /// Verified payloads of KV loaded from a tier or received from a prefill worker, waiting
    /// to be written into device blocks when the request is admitted.
    staged: Option<Staged>,
}

/// Blocks `first..first + payloads.len()` of a prompt, covering its tokens up to `covered`
/// (a transferred prompt's last block may be partial).
#[derive(Clone, Debug)]
struct Staged {
    first: usize,
    payloads: Vec<Vec<u8>>,
    covered: usize,
    /// From a prefill worker (not a tier of this one).
    transferred: bool,
}

impl Request {
    pub fn new(
        id: RequestId,
        prompt: Vec<TokenId>,
        priority: i32,
        extra_keys: Vec<String>,
    ) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed_tokens: 0,
            status: RequestStatus::Waiting,
            priority,
            arrival: 0,
            extra_keys,
            num_cached_tokens: None,
            first_scheduled: None,
            num_preemptions: 0,
            kv_probed: false,
            staged: None,
        }
    }

    pub fn output_tokens(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len..]
    }
}

/// One request's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Tokens already in the cache before this step.
    pub num_computed_tokens: usize,
    /// Tokens computed in this step.
    pub num_new_tokens: usize,
    /// Whether this step reaches the end of the request's known tokens, so it samples a token.
    pub samples: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SchedulerOutput {
    /// Decodes (one token, continuing a running request) first, then prefill chunks.
    pub seqs: Vec<ScheduledSeq>,
    /// Blocks loaded from a tier: each payload must be written into its device block before
    /// the step runs (the step's attention reads them).
    pub kv_writes: Vec<(BlockId, Vec<u8>)>,
    pub preempted: Vec<RequestId>,
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    next_arrival: u64,
    num_preemptions: u64,
    /// The tiers below the device (None: off).
    connector: Option<KvConnector>,
    /// Requests whose prefix is loading (status `WaitingForKv`).
    num_waiting_for_kv: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, kv: KvCacheManager) -> Self {
        Self {
            config,
            kv,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            num_preemptions: 0,
            connector: None,
            num_waiting_for_kv: 0,
        }
    }

    /// The limits it schedules under (batch size, token budget, queue bound).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Loads prefixes from the tiers below the device through `connector`.
    pub fn set_connector(&mut self, connector: KvConnector) {
        self.kv.record_changes();
        self.connector = Some(connector);
    }

    pub fn connector(&self) -> Option<&KvConnector> {
        self.connector.as_ref()
    }

    /// Blocks published and evicted since the last call (see
    /// [`KvCacheManager::record_changes`]).
    pub fn take_kv_changes(
        &mut self,
    ) -> (Vec<crate::kv::CommittedBlock>, Vec<crate::kv::BlockHash>) {
        (self.kv.take_committed(), self.kv.take_evicted())
    }

    /// Keeps published and evicted blocks for [`Self::take_kv_changes`] (KV events).
    pub fn record_kv_changes(&mut self) {
        self.kv.record_changes();
    }

    /// Requests waiting for a load from a tier.
    pub fn num_waiting_for_kv(&self) -> usize {
        self.num_waiting_for_kv
    }

    /// Takes finished loads (waiting up to `wait` for one when loads are in flight and none is
    /// ready): each loaded request goes back to the front of the waiting queue with its
    /// payloads staged.
    pub fn poll_kv_loads(&mut self, wait: std::time::Duration) {
        let Some(c) = &mut self.connector else {
            return;
        };
        for (id, first, payloads) in c.poll(wait) {
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            if r.status != RequestStatus::WaitingForKv {
                continue;
            }
            r.status = RequestStatus::Waiting;
            if !payloads.is_empty() {
                let covered = (first + payloads.len()) * self.kv.block_size();
                r.staged = Some(Staged {
                    first,
                    payloads,
                    covered,
                    transferred: false,
                });
            }
            self.num_waiting_for_kv -= 1;
            self.waiting.push_front(id);
        }
    }

    pub fn add_request(&mut self, mut req: Request) {
        req.arrival = self.next_arrival;
        self.next_arrival += 1;
        req.status = RequestStatus::Waiting;
        self.waiting.push_back(req.id.clone());
        self.requests.insert(req.id.clone(), req);
    }

    pub fn contains(&self, id: &RequestId) -> bool {
        self.requests.contains_key(id)
    }

    pub fn request(&self, id: &RequestId) -> Option<&Request> {
        self.requests.get(id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Keeps every KV block of `id` while it runs, sliding window or not (its KV is sent to
    /// another worker when it finishes).
    pub fn keep_all_blocks(&mut self, id: &RequestId) {
        self.kv.keep_all(id);
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn block_table(&self, id: &RequestId) -> &[BlockId] {
        self.kv.block_table(id)
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.prefix_cache_stats()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Appends a sampled token to a running request.
    pub fn append_token(&mut self, id: &RequestId, token: TokenId) {
        if let Some(r) = self.requests.get_mut(id) {
            r.tokens.push(token);
        }
    }

    /// Removes a finished request like [`Self::finish`] but keeps its KV blocks referenced;
    /// returns them (its whole table, prompt first) for [`Self::release_blocks`].
    pub fn finish_keeping_blocks(
        &mut self,
        id: &RequestId,
        reason: FinishReason,
    ) -> Option<(Request, Vec<BlockId>)> {
        let blocks = self.kv.detach(id);
        let req = self.finish(id, reason)?;
        Some((req, blocks))
    }

    /// Frees blocks kept by [`Self::finish_keeping_blocks`].
    pub fn release_blocks(&mut self, blocks: Vec<BlockId>) {
        self.kv.release(blocks);
    }

    /// Adds a request whose first `covered` prompt tokens' KV came from elsewhere (a prefill
    /// worker): `payloads[i]` is block `i`'s K and V. They are written into its blocks when it
    /// is admitted; only what they do not cover is computed (at least the last prompt token,
    /// whose logits give the first output token).
    pub fn add_request_with_kv(
        &mut self,
        mut req: Request,
        payloads: Vec<Vec<u8>>,
        covered: usize,
    ) {
        req.kv_probed = true;
        req.staged = Some(Staged {
            first: 0,
            payloads,
            covered,
            transferred: true,
        });
        self.add_request(req);
    }

    /// Removes a request (finished or aborted) and frees its blocks. Returns it if it existed.
    pub fn finish(&mut self, id: &RequestId, reason: FinishReason) -> Option<Request> {
        let mut req = self.requests.remove(id)?;
        if req.status == RequestStatus::WaitingForKv {
            // Its load's result, when it comes, finds no request and is dropped.
            self.num_waiting_for_kv -= 1;
        }
        self.running.retain(|r| r != id);
        self.waiting.retain(|r| r != id);
        self.kv.free(id);
        req.status = RequestStatus::Finished(reason);
        Some(req)
    }

    /// Records that the step planned as `out` ran: the KV of its tokens is written, so its full
    /// blocks become visible to the prefix cache. Not called for a failed step, whose requests
    /// are aborted instead.
    pub fn commit_step(&mut self, out: &SchedulerOutput) {
        for s in &out.seqs {
            if let Some(r) = self.requests.get(&s.id) {
                self.kv
                    .commit(&s.id, &r.tokens, s.num_computed_tokens + s.num_new_tokens);
            }
        }
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.config.max_num_batched_tokens;
        let mut decodes: Vec<ScheduledSeq> = Vec::new();
        let mut prefills: Vec<ScheduledSeq> = Vec::new();
        let mut preempted: Vec<RequestId> = Vec::new();
        let mut kv_writes: Vec<(BlockId, Vec<u8>)> = Vec::new();
        self.poll_kv_loads(std::time::Duration::ZERO);

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i].clone();
            let (remaining, computed) = {
                let r = &self.requests[&id];
                (
                    r.tokens.len() - r.num_computed_tokens,
                    r.num_computed_tokens,
                )
            };
            let num_new = remaining.min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let mut scheduled = false;
            loop {
                let r = &self.requests[&id];
                if self.kv.allocate_slots(
                    &id,
                    &r.tokens,
                    computed,
                    num_new,
                    &Default::default(),
                    &r.extra_keys,
                ) {
                    scheduled = true;
                    break;
                }
                let victim = self.pick_victim();
                let victim_pos = self.running.iter().position(|r| *r == victim);
                self.preempt(&victim);
                preempted.push(victim.clone());
                // Undo the victim's share of this step if it was already scheduled.
                for list in [&mut decodes, &mut prefills] {
                    if let Some(p) = list.iter().position(|s| s.id == victim) {
                        budget += list.remove(p).num_new_tokens;
                    }
                }
                if victim == id {
                    break;
                }
                if let Some(p) = victim_pos {
                    if p < i {
                        i -= 1;
                    }
                }
            }
            if !scheduled {
                // The request preempted itself; `running[i]` is now the next one.
                continue;
            }
            let r = self.requests.get_mut(&id).expect("running request exists");
            let seq = ScheduledSeq {
                id: id.clone(),
                num_computed_tokens: computed,
                num_new_tokens: num_new,
                samples: computed + num_new == r.tokens.len(),
            };
            r.num_computed_tokens += num_new;
            budget -= num_new;
            if remaining == 1 && computed >= r.prompt_len {
                decodes.push(seq);
            } else {
                prefills.push(seq);
            }
            i += 1;
        }

        if preempted.is_empty() {
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(pos) = self.next_waiting() else {
                    break;
                };
                let id = self.waiting[pos].clone();
                let r = &self.requests[&id];
                let hit = if r.num_computed_tokens == 0 {
                    self.kv.find_computed_blocks(&id, &r.tokens, &r.extra_keys)
                } else {
                    Default::default()
                };
                let bs = self.kv.block_size();
                let device_blocks = hit.num_positions();
                if let Some(c) = &mut self.connector {
                    if !r.kv_probed && r.num_computed_tokens == 0 && r.staged.is_none() {
                        let hashes = self.kv.prompt_block_hashes(&r.tokens, &r.extra_keys);
                        let r = self.requests.get_mut(&id).expect("waiting request exists");
                        r.kv_probed = true;
                        if let Some(rest) = hashes.get(device_blocks..) {
                            if c.start_load(&id, device_blocks, rest).is_some() {
                                r.status = RequestStatus::WaitingForKv;
                                self.num_waiting_for_kv += 1;
                                self.waiting.remove(pos);
                                continue;
                            }
                        }
                    }
                }
                let r = &self.requests[&id];
                if r.num_computed_tokens == 0 {
                    self.kv
                        .count_lookup(r.tokens.len(), hit.num_computed_tokens);
                }
                // Staged blocks that continue the device hit: written into fresh blocks. They
                // count up to what they cover, short of the last prompt token (it must run
                // for its logits).
                let mut loaded: Vec<Vec<u8>> = Vec::new();
                let mut computed = hit.num_computed_tokens;
                let transferred = r.staged.as_ref().is_some_and(|s| s.transferred);
                if let Some(st) = &r.staged {
                    if (st.first..st.first + st.payloads.len()).contains(&device_blocks) {
                        let upto = st.covered.min(r.tokens.len() - 1);
                        let max_blocks = upto.div_ceil(bs);
                        loaded = st.payloads[device_blocks - st.first..]
                            .iter()
                            .take(max_blocks.saturating_sub(device_blocks))
                            .cloned()
                            .collect();
                        computed = ((device_blocks + loaded.len()) * bs).min(upto);
                    }
                }
                let remaining = r.tokens.len() - computed;
                if !self.config.enable_chunked_prefill && remaining > budget {
                    break;
                }
                let num_new = remaining.min(budget);
                if !self
                    .kv
                    .allocate_slots(&id, &r.tokens, computed, num_new, &hit, &r.extra_keys)
                {
                    break;
                }
                self.waiting.remove(pos);
                if !loaded.is_empty() {
                    let table = self.kv.block_table(&id);
                    kv_writes.extend(
                        table[device_blocks..device_blocks + loaded.len()]
                            .iter()
                            .copied()
                            .zip(loaded.iter().cloned()),
                    );
                    if let (Some(c), false) = (&self.connector, transferred) {
                        c.count_hit_tokens(computed - hit.num_computed_tokens);
                    }
                }
                let r = self.requests.get_mut(&id).expect("waiting request exists");
                r.staged = None;
                r.status = RequestStatus::Running;
                if r.num_cached_tokens.is_none() {
                    r.num_cached_tokens = Some(computed);
                    r.first_scheduled = Some(std::time::Instant::now());
                }
                let seq = ScheduledSeq {
                    id: id.clone(),
                    num_computed_tokens: computed,
                    num_new_tokens: num_new,
                    samples: computed + num_new == r.tokens.len(),
                };
                r.num_computed_tokens = computed + num_new;
                budget -= num_new;
                self.running.push(id);
                prefills.push(seq);
            }
        }

        let num_batched_tokens = self.config.max_num_batched_tokens - budget;
        decodes.extend(prefills);
        SchedulerOutput {
            seqs: decodes,
            kv_writes,
            preempted,
            num_batched_tokens,
        }
    }

    /// Index in `waiting` of the request to admit next.
    fn next_waiting(&self) -> Option<usize> {
        match self.config.policy {
            SchedulingPolicy::Fcfs => (!self.waiting.is_empty()).then_some(0),
            SchedulingPolicy::Priority => self
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, id)| {
                    let r = &self.requests[*id];
                    (r.priority, r.arrival)
                })
                .map(|(i, _)| i),
        }
    }

    /// The running request to preempt: the latest admitted (FCFS) or the lowest priority.
    fn pick_victim(&self) -> RequestId {
        let victim = match self.config.policy {
            SchedulingPolicy::Fcfs => self.running.last(),
            SchedulingPolicy::Priority => self.running.iter().max_by_key(|id| {
                let r = &self.requests[*id];
                (r.priority, r.arrival)
            }),
        };
        victim.cloned().expect("preemption needs a running request")
    }

    fn preempt(&mut self, id: &RequestId) {
        self.kv.free(id);
        self.running.retain(|r| r != id);
        if let Some(r) = self.requests.get_mut(id) {
            r.status = RequestStatus::Preempted;
            r.num_computed_tokens = 0;
            r.num_preemptions += 1;
            // Its blocks may be below the device by the time it resumes.
            r.kv_probed = false;
        }
        self.num_preemptions += 1;
        self.waiting.push_front(id.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockHashAlgo, BlockHasher};

    fn sched(blocks: usize, budget: usize, max_seqs: usize) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: budget,
            ..Default::default()
        };
        Scheduler::new(
            config,
            KvCacheManager::new(blocks, 4, true, BlockHasher::new(BlockHashAlgo::Xxh3, "0")),
        )
    }

    fn req(id: &str, len: usize, base: u32) -> Request {
        Request::new(
            id.into(),
            (0..len as u32).map(|t| t + base).collect(),
            0,
            vec![],
        )
    }

    /// Runs a step as the engine would: sampling requests get a token.
    fn step(s: &mut Scheduler) -> SchedulerOutput {
        let out = s.schedule();
        s.commit_step(&out);
        for seq in &out.seqs {
            if seq.samples {
                s.append_token(&seq.id, 7);
            }
        }
        out
    }

    #[test]
    fn chunked_prefill_respects_budget_and_mixes_decodes() {
        let mut s = sched(64, 8, 4);
        s.add_request(req("a", 5, 0));
        let o = step(&mut s);
        assert_eq!(o.seqs.len(), 1);
        assert_eq!((o.seqs[0].num_new_tokens, o.seqs[0].samples), (5, true));
        s.add_request(req("b", 20, 100));
        // a decodes (1 token), b gets the other 7 of the budget.
        let o = step(&mut s);
        assert_eq!(o.num_batched_tokens, 8);
        assert_eq!(o.seqs[0].id, "a".into());
        assert_eq!(o.seqs[0].num_new_tokens, 1);
        assert_eq!((o.seqs[1].num_new_tokens, o.seqs[1].samples), (7, false));
        let o = step(&mut s);
        assert_eq!(o.seqs[1].num_computed_tokens, 7);
        assert_eq!(o.seqs[1].num_new_tokens, 7);
        let o = step(&mut s);
        assert_eq!((o.seqs[1].num_new_tokens, o.seqs[1].samples), (6, true));
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut s = sched(64, 100, 2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            s.add_request(req(id, 3, i as u32 * 10));
        }
        let o = step(&mut s);
        assert_eq!(o.seqs.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        s.finish(&"a".into(), FinishReason::Stop);
        let o = step(&mut s);
        assert_eq!(o.seqs.iter().filter(|q| q.id == "c".into()).count(), 1);
    }

    #[test]
    fn preemption_frees_latest_and_recomputes() {
        // 4 blocks of 4 tokens; two 6-token prompts take 2 blocks each; growing past 8 tokens
        // needs a third block, so the later request is preempted.
        let mut s = sched(4, 64, 4);
        s.add_request(req("a", 6, 0));
        s.add_request(req("b", 6, 50));
        step(&mut s);
        step(&mut s); // a, b at 7 tokens
        step(&mut s); // 8 tokens, blocks full
        let o = step(&mut s);
        assert_eq!(o.preempted, vec![RequestId::from("b")]);
        assert_eq!(
            s.request(&"b".into()).unwrap().status,
            RequestStatus::Preempted
        );
        assert_eq!(s.num_running(), 1);
        // After a finishes, b resumes and recomputes all its 9 tokens (some from the cache).
        s.finish(&"a".into(), FinishReason::Stop);
        let o = step(&mut s);
        let b = &o.seqs[0];
        assert_eq!(b.num_computed_tokens + b.num_new_tokens, 9);
        assert!(b.samples);
        s.finish(&"b".into(), FinishReason::Stop);
        assert_eq!(s.kv().num_free_blocks(), 4);
    }

    #[test]
    fn priority_policy_admits_and_preempts_by_priority() {
        let config = SchedulerConfig {
            max_num_seqs: 1,
            max_num_batched_tokens: 64,
            policy: SchedulingPolicy::Priority,
            ..Default::default()
        };
        let mut s = Scheduler::new(
            config,
            KvCacheManager::new(16, 4, true, BlockHasher::new(BlockHashAlgo::Xxh3, "0")),
        );
        let mut low = req("low", 3, 0);
        low.priority = 5;
        let mut high = req("high", 3, 10);
        high.priority = -1;
        s.add_request(low);
        s.add_request(high);
        let o = step(&mut s);
        assert_eq!(o.seqs[0].id, "high".into());
    }

    #[test]
    fn prefix_hits_skip_cached_tokens() {
        let mut s = sched(64, 256, 4);
        s.add_request(req("a", 40, 0));
        step(&mut s);
        s.finish(&"a".into(), FinishReason::Stop);
        s.add_request(req("b", 42, 0));
        let o = step(&mut s);
        // 10 full blocks of 4 hit the cache; only the 2 new tokens run.
        assert_eq!(o.seqs[0].num_computed_tokens, 40);
        assert_eq!(o.seqs[0].num_new_tokens, 2);
        assert_eq!(s.request(&"b".into()).unwrap().num_cached_tokens, Some(40));
    }
}
