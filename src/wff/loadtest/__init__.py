"""Load testing of a served ensemble: ``wff bench`` (throughput, latency, memory; baselines without
Triton) and ``wff soak`` (good and bad patients for a fixed time, memory trend). Unlike wff.client,
it starts tritonserver and, for the baselines and FLOP counts, uses the training code."""
