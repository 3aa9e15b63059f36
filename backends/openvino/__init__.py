"""OpenVINO GenAI's ContinuousBatchingPipeline, run in its own process.

`step()` holds the GIL for the whole step, so a pipeline stepped inside the server process stalls the event
loop for every step (and every token then waits for the next step to reach its client). The pipeline lives
in a child process instead, which does nothing but step it: it takes new requests and aborts between steps,
steps while anything is unfinished, and after each step sends every request's new token ids, log-probs and
status back in one message. In the server process a reader thread turns those into text (our TextAssembler:
stop sequences are ours, not the engine's) and hands the events to the requests' asyncio queues, one
wake-up per event loop per step, while the child already computes the next step.

Modules: `adapter` (the Backend and its reader thread), `engine_process` (the child's step loop), `pipeline`
(pipeline, scheduler and per-request generation settings from our config), `ir_export` (HF -> IR, cached).
"""
