"""Settings shared by the tests that train for a few steps on the small toy world (not a test module)."""

# A few short mining rounds: 16 queries per epoch in rounds of 8, 4 tuples per step with 3 negatives each drawn from
# 20 sampled database images, seed 3, lr 1e-3 (large enough that a step visibly moves the weights).
SHORT_TRAINING = [
    "--seed",
    "3",
    "--queries_per_epoch",
    "16",
    "--cache_refresh_rate",
    "8",
    "--train_batch_size",
    "4",
    "--negs_num_per_query",
    "3",
    "--neg_samples_num",
    "20",
    "--lr",
    "1e-3",
]
