"""A complete model file for `capdiag check examples/minimal_model.py`: the contract, minimal."""
import torch
from torch import nn

CAPDIAG = dict(vocab_size=100, pad_id=0, bos_id=1, eos_id=2, image_size=64, image_module="encoder")


class Captioner(nn.Module):
    def __init__(self, vocab_size=100, d=128):
        super().__init__()
        self.encoder = nn.Sequential(  # images (B, 3, 64, 64) -> (B, d, 4, 4)
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, d, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(64, d)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 4, 256, batch_first=True), 2)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, images, captions):  # captions: (B, T) BOS ... EOS pad pad
        memory = self.encoder(images).flatten(2).transpose(1, 2)  # (B, 16, d)
        T = captions.shape[1]
        x = self.embed(captions) + self.pos(torch.arange(T, device=captions.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        return self.head(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))  # (B, T, V)


def build_model():
    return Captioner()
