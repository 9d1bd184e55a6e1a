"""Continuous batching: every request for a model joins that model's running batch.

mlx-lm's BatchGenerator does the work: new prompts are prefilled in chunks between decode steps,
and each decode step runs every active sequence through the weights at once, so that several
clients cost little more than one. Each sequence keeps its own sampler, logits processors
(penalties, grammar), stop tokens, budget and prompt-cache prefix; one that is cancelled, or meets a
stop string, leaves the batch at the next step and frees its slot.

A request whose prompt the prompt cache already holds (all but its last token) has nothing to
prefill. When it arrives with others whose prefill ends in the coming step, it waits for that step:
the generator then starts them all with one pass through the model instead of two, and they decode
in step from then on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runtime.cpu import blas
from runtime.generation import Failed, Finished, Plan, Started, early_finish, final_reason, sampler_for
from runtime.prompt_cache import PromptCache
from runtime.tuning import DecodeThreads


@dataclass(frozen=True)
class BatchLimits:
    max_sequences: int = 8  # decoded together; further requests wait for a free slot
    prefill_chunk: int = 512  # prompt tokens per prefill step, between decode steps of the others


@dataclass
class Sequence:
    """One request in a batch."""
    job: object  # engine.Job
    plan: Plan
    detokenizer: object
    started: float = field(default_factory=time.perf_counter)
    finished: Finished | None = None

    def emit(self, events: list) -> None:
        for event in events:
            self.job.put(event)

    def finish(self, reason: str, record) -> None:
        """Send the last events; `record(finished, seconds)` runs first, so a client that has its answer
        already sees it in the runtime's statistics."""
        plan = self.plan
        self.emit(plan.parser.finish())
        self.finished = Finished(final_reason(reason, plan.parser), len(plan.prompt), len(plan.generated), plan.cached)
        record(self.finished, time.perf_counter() - self.started)
        self.job.put(self.finished)


@dataclass
class Held:
    """A request with nothing to prefill, waiting to join the generator (see `Batch._release_held`)."""
    since: int  # steps the batch had run when it arrived
    job: object
    plan: Plan
    cache: list


class Batch:
    """The running batch of one loaded model."""

    def __init__(self, loaded, prompt_cache: PromptCache, limits: BatchLimits, record):
        from mlx_lm.generate import BatchGenerator

        self.loaded = loaded
        self.prompt_cache = prompt_cache
        self.record = record  # record(Finished, seconds): the runtime's statistics
        self.generator = BatchGenerator(
            loaded.model, completion_batch_size=limits.max_sequences, prefill_batch_size=limits.max_sequences,
            prefill_step_size=limits.prefill_chunk, stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
        )
        self.sequences: dict[int, Sequence] = {}
        self.decode_threads = DecodeThreads(loaded.tuning)
        self.prefill_chunk = limits.prefill_chunk
        self.prefilling: dict[int, int] = {}  # uid -> prompt tokens still to prefill before the last
        self.held: list[Held] = []
        self.steps = 0  # run so far

    def __len__(self) -> int:
        return len(self.sequences) + len(self.held)

    def decoding(self) -> int:
        """Sequences past their prompt (the others wait for a slot or are being prefilled)."""
        return sum(1 for sequence in self.sequences.values() if sequence.plan.sampled)

    def admit(self, job, plan: Plan, cache: list) -> None:
        """Into the generator; one with nothing to prefill decides at the next step (see `_release_held`)."""
        job.put(Started(len(plan.prompt), plan.budget, plan.cached))
        if unprefilled(plan):
            self._insert(job, plan, cache)
        else:
            self.held.append(Held(self.steps, job, plan, cache))

    def _insert(self, job, plan: Plan, cache: list) -> None:
        (uid,) = self.generator.insert(
            [plan.prompt[plan.cached :]], max_tokens=[plan.budget], caches=[cache],
            all_tokens=[plan.prompt[: plan.cached]], samplers=[sampler_for(plan.params)],
            logits_processors=[plan.processors],
        )
        self.sequences[uid] = Sequence(job, plan, self.loaded.tokenizer.detokenizer)
        if left := unprefilled(plan):
            self.prefilling[uid] = left

    def _prefills_end_next_step(self) -> bool:
        """Whether sequences are being prefilled, and every one of them is on its last chunk."""
        return bool(self.prefilling) and max(self.prefilling.values()) <= self.prefill_chunk

    def step(self) -> list[Sequence]:
        """A prefill chunk and a decode step for the whole batch; returns the sequences that ended."""
        ended = self._drop_cancelled()
        self._release_held()
        self.steps += 1
        size = len(self)
        decode_only = self.decoding() == size
        threads = self.decode_threads.next(size) if decode_only else self.loaded.tuning.prefill_threads
        blas.set_threads(threads)
        started = time.perf_counter()
        prompt_responses, responses = self.generator.next()
        if decode_only:
            self.decode_threads.record(size, threads, time.perf_counter() - started)
        self._track_prefills(prompt_responses)
        ended += [sequence for response in responses if (sequence := self._deliver(response))]
        return ended

    def _release_held(self) -> None:
        """Insert the held sequences, but for those that arrived since the last step while the prefills
        under way end in the next: they join in the step after, together with those."""
        wait = self._prefills_end_next_step()
        held, self.held = self.held, []
        for entry in held:
            if wait and entry.since == self.steps:
                self.held.append(entry)
            else:
                self._insert(entry.job, entry.plan, entry.cache)

    def _track_prefills(self, prompt_responses) -> None:
        for response in prompt_responses:
            if response.uid in self.prefilling:
                done, total = response.progress
                if (left := total - 1 - done) > 0:
                    self.prefilling[response.uid] = left
                else:
                    del self.prefilling[response.uid]

    def fail(self, error: Exception) -> list[Sequence]:
        """End every sequence with `error` (the generator's state is then unusable)."""
        held = [Sequence(entry.job, entry.plan, self.loaded.tokenizer.detokenizer) for entry in self.held]
        ended, self.sequences, self.held = [*self.sequences.values(), *held], {}, []
        for sequence in ended:
            sequence.job.put(Failed(error))
        return ended

    def close(self) -> None:
        self.generator.close()

    def _drop_cancelled(self) -> list[Sequence]:
        gone = [uid for uid, sequence in self.sequences.items() if sequence.job.cancelled.is_set()]
        if gone:
            self.generator.remove(gone)
        ended = [self.sequences.pop(uid) for uid in gone]
        for uid in gone:
            self.prefilling.pop(uid, None)
        for sequence in ended:
            sequence.finish("cancelled", self.record)
        return ended

    def _deliver(self, response) -> Sequence | None:
        """Hand one sampled token to its sequence; the sequence if it has ended."""
        sequence, token = self.sequences[response.uid], response.token
        sequence.plan.sampled.append(token)
        if response.finish_reason != "stop":  # mlx-lm reports the EOS token itself with "stop"
            sequence.plan.generated.append(token)
            sequence.detokenizer.add_token(token)
        if response.finish_reason is not None:
            sequence.detokenizer.finalize()
        sequence.emit(sequence.plan.parser.feed(sequence.detokenizer.last_segment))
        if response.finish_reason is not None:
            return self._end(response.uid, response.finish_reason, response.prompt_cache, response.all_tokens)
        if reason := early_finish(sequence.plan.parser, sequence.job.cancelled):
            cache, tokens = self.generator.remove([response.uid], return_prompt_caches=True)[response.uid]
            return self._end(response.uid, reason, cache, tokens)
        return None

    def _end(self, uid: int, reason: str, cache: list, tokens: list[int]) -> Sequence:
        sequence = self.sequences.pop(uid)
        self.prefilling.pop(uid, None)
        sequence.finish(reason, self.record)
        # Filed under exactly the tokens it holds, so a follow-up turn reuses it.
        self.prompt_cache.store(self.loaded.cache_key, list(tokens), cache)
        return sequence


def unprefilled(plan: Plan) -> int:
    """Prompt tokens the model has yet to see before the last one (which the first decode step feeds)."""
    return max(len(plan.prompt) - plan.cached - 1, 0)
