"""ASR models on one shared speech encoder (a WhisperEncoder run on per-batch padded features).

- :mod:`encoder`: the encoder, its padding mask and length arithmetic;
- :mod:`ctc`: encoder + linear CTC head, greedy CTC decoding;
- :mod:`aed`: Whisper encoder-decoder + CTC head, joint CTC/attention loss (syn2real);
- :mod:`projector`, :mod:`llm_asr`: encoder -> frame-stacking MLP -> causal LM with LoRA (hdmole, efin);
- :mod:`batch`: the batch convention every model's ``forward`` and ``generate`` share.
"""

from asrlab.models.aed import AEDConfig, AEDModel
from asrlab.models.ctc import CTCConfig, CTCModel
from asrlab.models.encoder import EncoderConfig, SpeechEncoder
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig, LoRASettings

__all__ = ["AEDConfig", "AEDModel", "CTCConfig", "CTCModel", "EncoderConfig", "SpeechEncoder", "LLMASR",
           "LLMASRConfig", "LMConfig", "LoRASettings"]
