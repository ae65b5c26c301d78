// Loads a tokenizer into the npm `tokenizers` package (the Hugging Face Rust library): a
// tokenizer.json file as is, or a GPT-2 folder (vocab.json + merges.txt, or encoder.json +
// vocab.bpe) turned into the tokenizer.json that Hugging Face's GPT2TokenizerFast would save.
'use strict';
const fs = require('fs');
const path = require('path');

function gpt2TokenizerJson(dir) {
  const pick = (a, b) => (fs.existsSync(path.join(dir, a)) ? path.join(dir, a) : path.join(dir, b));
  const vocab = JSON.parse(fs.readFileSync(pick('vocab.json', 'encoder.json'), 'utf8'));
  const merges = fs.readFileSync(pick('merges.txt', 'vocab.bpe'), 'utf8')
    .split('\n')
    .filter((line, i) => line.length > 0 && !(i === 0 && line.startsWith('#version')));
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  return JSON.stringify({
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [{
      id: vocab['<|endoftext|>'], content: '<|endoftext|>', single_word: false, lstrip: false,
      rstrip: false, normalized: false, special: true,
    }],
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: null,
    decoder: byteLevel,
    model: {
      type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null,
      end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, vocab, merges,
    },
  });
}

function loadHfTokenizer(tokenizersModule, p) {
  const { Tokenizer } = require(tokenizersModule);
  if (fs.statSync(p).isDirectory()) return Tokenizer.fromString(gpt2TokenizerJson(p));
  return Tokenizer.fromFile(p);
}

function readCorpus(file) {
  let text;
  if (file.endsWith('.zst')) {
    const r = require('child_process').spawnSync('zstd', ['-dc'], { input: fs.readFileSync(file), maxBuffer: 1 << 30 });
    if (r.status !== 0) throw new Error(`zstd -dc ${file} failed: ${r.stderr}`);
    text = r.stdout.toString('utf8');
  } else {
    text = fs.readFileSync(file, 'utf8');
  }
  return text.split('\n').filter((l) => l.length > 0).map((l) => JSON.parse(l));
}

module.exports = { gpt2TokenizerJson, loadHfTokenizer, readCorpus };
