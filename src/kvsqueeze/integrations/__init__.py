"""kvsqueeze inside other tools: `integrations.lm_eval` is a model for EleutherAI's lm-evaluation-harness."""
