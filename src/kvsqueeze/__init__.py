"""kvsqueeze: compress the KV cache of any Hugging Face causal LM, and really free the memory."""

from .budgets import Uniform
from .methods.pyramidkv import Pyramid
from .cache import EvictingLayer, SlidingWindowLayer, SqueezeCache
from .convert import as_squeeze_cache
from .forward import CompressionNotAppliedError
from .hooks import attached
from .ragged import RaggedLayer
from .quantizers import GEAR, KIVI, KVQuant, Quantizer, quantizer
from .methods import *  # noqa: F401,F403  every method class, by name
from .methods import Method, MissingAttentionWeights, ScorerMethod, UnknownMethodError, available, l2_compress, method
from .memory import release_freed_memory
from .models import load
from .inputs import ContextTooLongError
from .pipeline import CompressedContext, CompressionStats, compress
from .saved import CorruptContextError, ModelMismatchError
from .attention import UnsupportedModelError
from .branches import compress_each
from . import hf_pipeline  # noqa: F401  registers the "kvsqueeze-text-generation" pipeline task

__version__ = "0.1.0"
