"""CosyVoice2's flow matching in MLX: speech tokens to 80-bin mel at 50 Hz.

Modules (each ports the official file of the same name, names kept so the
`flow.pt` keys map one to one):

- `flow.py`: `CausalMaskedDiffWithXvec` (embeddings, encoder, CFM; `inference`, `sanitize`);
- `encoder.py`: `UpsampleConformerEncoder` with `PreLookaheadLayer`, `Upsample1D`,
  espnet relative-position attention;
- `flow_matching.py`: `CausalConditionalCFM` (Euler, cosine schedule, batched CFG);
- `decoder.py`: the U-Net estimator (`CausalConditionalDecoder`, `ConditionalDecoder`);
- `noise.py`: the official fixed starting noise, computed without torch;
- `ops.py`: convolution, mask and activation helpers.
"""

from cosyvoice2.flow.decoder import CausalConditionalDecoder, ConditionalDecoder
from cosyvoice2.flow.encoder import UpsampleConformerEncoder
from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice2.flow.flow_matching import CausalConditionalCFM
from cosyvoice2.flow.noise import cfm_noise

__all__ = [
    "CausalConditionalCFM",
    "CausalConditionalDecoder",
    "CausalMaskedDiffWithXvec",
    "ConditionalDecoder",
    "UpsampleConformerEncoder",
    "cfm_noise",
]
