// Builds the tokenizer conformance corpus at test time (nothing of it is committed except the
// hand-written tests/data/tokenizer/multilingual.txt):
//   - English prose:   /usr/share/common-licenses (base-files) and the POD in Perl's modules
//                      (/usr/share/perl, part of build-essential's dependencies)
//   - source code:     C headers from /usr/include (libc6-dev, linux-libc-dev), Perl modules
//   - numbers, dates, long whitespace and newline runs, and text in many scripts and emoji:
//                      generated below from a fixed seed
//   - the hand-written multilingual sample (Chinese, Japanese, Korean, emoji, other scripts)
//   - every added token of the tokenizer, alone on a line and inside text
// Files that are not valid UTF-8 are skipped. The output is valid UTF-8; with --invalid a second,
// small file of invalid UTF-8 lines is written too.
//
//   node tests/js/make_corpus.js --tokenizer TOKENIZER_JSON --out FILE [--size BYTES] [--invalid FILE]
"use strict";
const fs = require("fs");
const path = require("path");

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const outPath = opt("--out");
const tokPath = opt("--tokenizer");
const target = Number(opt("--size", "1100000"));
const invalidPath = opt("--invalid");
if (!outPath || !tokPath || !(target > 0)) {
  process.stderr.write("usage: make_corpus.js --tokenizer TOKENIZER_JSON --out FILE [--size BYTES] [--invalid FILE]\n");
  process.exit(2);
}

const strict = new TextDecoder("utf-8", { fatal: true });
function readText(p) {
  try {
    const b = fs.readFileSync(p);
    return strict.decode(b);
  } catch (e) {
    return null; // unreadable or not UTF-8
  }
}

function listFiles(dir, pred, out = [], seen = new Set()) {
  let ents;
  try {
    ents = fs.readdirSync(dir, { withFileTypes: true });
  } catch (e) {
    return out;
  }
  ents.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const e of ents) {
    const p = path.join(dir, e.name);
    let st;
    try {
      st = fs.statSync(p);
    } catch (err) {
      continue;
    }
    let real;
    try {
      real = fs.realpathSync(p);
    } catch (err) {
      continue;
    }
    if (seen.has(real)) continue;
    seen.add(real);
    if (st.isDirectory()) listFiles(p, pred, out, seen);
    else if (st.isFile() && pred(p)) out.push(p);
  }
  return out;
}

// Takes whole files from the list until `budget` bytes are used.
function take(files, budget) {
  const parts = [];
  let used = 0;
  for (const f of files) {
    if (used >= budget) break;
    const t = readText(f);
    if (t === null || t.length === 0) continue;
    const s = t.length > budget - used + 4096 ? t.slice(0, Math.max(0, budget - used)) : t;
    parts.push(s);
    used += Buffer.byteLength(s);
  }
  return parts.join("\n");
}

// A fixed-seed generator so the corpus is the same on every run of one machine.
let seed = 0x2545f491;
function rnd() {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed / 4294967296;
}
const ri = (lo, hi) => lo + Math.floor(rnd() * (hi - lo + 1));
const pick = (a) => a[Math.floor(rnd() * a.length)];
const pad = (n, w) => String(n).padStart(w, "0");

function numbersAndDates(lines) {
  const months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December"];
  const out = [];
  for (let i = 0; i < lines; i++) {
    const y = ri(1900, 2099), m = ri(1, 12), d = ri(1, 28), H = ri(0, 23), M = ri(0, 59), S = ri(0, 59);
    const digits = Array.from({ length: ri(1, 40) }, () => ri(0, 9)).join("");
    const f = [
      `${y}-${pad(m, 2)}-${pad(d, 2)}`, `${pad(d, 2)}/${pad(m, 2)}/${y}`, `${months[m - 1]} ${d}, ${y}`,
      `${y}-${pad(m, 2)}-${pad(d, 2)}T${pad(H, 2)}:${pad(M, 2)}:${pad(S, 2)}Z`, `${H}:${pad(M, 2)}`,
      `${y}年${m}月${d}日`, `${y}년 ${m}월 ${d}일`, digits, `${ri(0, 99999)}.${ri(0, 9999)}`,
      `-${ri(1, 999)}e${ri(-30, 30)}`, `${ri(1, 999)},${pad(ri(0, 999), 3)},${pad(ri(0, 999), 3)}`,
      `0x${ri(0, 0xffffff).toString(16)}`, `v${ri(0, 20)}.${ri(0, 99)}.${ri(0, 999)}`,
      `${ri(0, 255)}.${ri(0, 255)}.${ri(0, 255)}.${ri(0, 255)}`, `+${ri(1, 99)} ${ri(100, 999)} ${ri(1000, 9999)}`,
      `${ri(0, 100)}%`, `$${ri(0, 9999)}.${pad(ri(0, 99), 2)}`, `${digits}${pick(["px", "ms", "kg", "MB", "th"])}`,
      String.fromCodePoint(...Array.from(digits.slice(0, 6)).map((c) => 0x0660 + Number(c))), // Arabic-Indic
      String.fromCodePoint(...Array.from(digits.slice(0, 6)).map((c) => 0xff10 + Number(c))), // fullwidth
      String.fromCodePoint(...Array.from(digits.slice(0, 6)).map((c) => 0x0966 + Number(c))), // Devanagari
      pick(["½", "¾", "²", "³", "Ⅻ", "ⅷ", "①", "⑳", "₂", "⁹"]),
    ];
    const n = ri(3, 9);
    const words = [];
    for (let k = 0; k < n; k++) words.push(pick(f));
    out.push(words.join(pick([" ", ", ", "; ", " - ", "  ", "\t", " | "])));
  }
  return out.join("\n");
}

const SPACES = [" ", "\t", "\u00a0", "\u3000", "\u2003", "\u2009", "\u202f", "\u205f", "\u1680", "\u0085", "\u180e",
  "\ufeff", "\u200b", "\u000b", "\u000c", "\u2028", "\u2029"];
function whitespaceRuns(blocks) {
  const out = [];
  for (let i = 0; i < blocks; i++) {
    const kind = ri(0, 7);
    const word = pick(["word", "x", "Hello", "世界", "42", "!?", "é", "😀", "_", "a.b"]);
    if (kind === 0) out.push(word + " ".repeat(ri(1, 300)) + word);
    else if (kind === 1) out.push(word + "\n".repeat(ri(1, 40)) + word);
    else if (kind === 2) out.push(" ".repeat(ri(1, 64)) + word + " ".repeat(ri(0, 64)));
    else if (kind === 3) out.push(word + "\t".repeat(ri(1, 20)) + word);
    else if (kind === 4) out.push(word + "\r\n".repeat(ri(1, 10)) + word + "\r" + word);
    else if (kind === 5) {
      let s = "";
      for (let k = ri(1, 30); k > 0; k--) s += pick(SPACES);
      out.push(word + s + word + pick(SPACES) + "\n" + pick(SPACES));
    } else if (kind === 6) out.push(word + " \n \n\t\n  \r\n   " + word);
    else out.push("\n".repeat(ri(1, 5)) + " ".repeat(ri(1, 9)) + "\n" + word);
  }
  return out.join(" ");
}

// Blocks whose characters and categories are settled since long before Unicode 14 (PCRE2 10.42's
// tables), so the comparison tests the tokenizer rather than the age of a Unicode database.
const BLOCKS = [
  [0x00a1, 0x00ff], [0x0100, 0x017f], [0x0391, 0x03a9], [0x03b1, 0x03c9], [0x0400, 0x04ff], [0x05d0, 0x05ea],
  [0x0621, 0x064a], [0x064b, 0x0652], [0x0905, 0x0939], [0x093e, 0x094c], [0x0e01, 0x0e3a], [0xac00, 0xd7a3],
  [0x3041, 0x3096], [0x30a1, 0x30fa], [0x4e00, 0x9fa5], [0x3400, 0x4db5], [0x0300, 0x036f], [0x2010, 0x2027],
  [0x20a0, 0x20b9], [0x2200, 0x22ff], [0x2190, 0x21ff], [0x2500, 0x257f], [0x1f600, 0x1f64f], [0x1f300, 0x1f5ff],
  [0x1f680, 0x1f6c5], [0x1f3fb, 0x1f3ff], [0x1f1e6, 0x1f1ff], [0xff01, 0xff5e], [0xff66, 0xff9d], [0x0001, 0x0008],
  [0xe000, 0xe0ff], [0x2460, 0x24ff], [0x0041, 0x007a], [0x0021, 0x002f],
];
const JOINERS = ["\u200d", "\ufe0f", "\u20e3", "\u00ad", "\u200b", "\u0301"];
function scripts(words) {
  const out = [];
  for (let i = 0; i < words; i++) {
    const [lo, hi] = pick(BLOCKS);
    let w = "";
    for (let k = ri(1, 8); k > 0; k--) {
      w += String.fromCodePoint(ri(lo, hi));
      if (rnd() < 0.05) w += pick(JOINERS);
    }
    out.push(w);
    out.push(pick([" ", " ", " ", "", ", ", ". ", "\n", "  ", "!", "'s ", "-", "（", "」"]));
  }
  return out.join("");
}

const tok = JSON.parse(fs.readFileSync(tokPath, "utf8"));
function specials() {
  const added = tok.added_tokens.map((t) => t.content);
  const out = [];
  for (const c of added) out.push(c);
  // inside text, glued to each other, and next to spaces and newlines
  for (let i = 0; i < added.length; i++) {
    const a = added[i], b = added[(i * 7 + 3) % added.length];
    out.push(`text${a}more ${a} ${b}${a}\t${a}\n${a}  x${b}${b}42${a}你好`);
  }
  return out.join("\n");
}

const sampleDir = path.join(__dirname, "..", "data", "tokenizer");
const sample = readText(path.join(sampleDir, "multilingual.txt"));
if (sample === null) {
  process.stderr.write("make_corpus.js: tests/data/tokenizer/multilingual.txt is missing or not UTF-8\n");
  process.exit(1);
}

// Generated parts are sized as fixed fractions of the target; system text fills the rest.
const gen = [
  numbersAndDates(Math.ceil(target * 0.06 / 60)),
  whitespaceRuns(Math.ceil(target * 0.03 / 60)),
  scripts(Math.ceil(target * 0.08 / 9)),
  sample,
  specials(),
].join("\n");
// (at least half the target is machine text, however large the generated part is)
const rest = Math.max(Math.floor(target / 2), target - Buffer.byteLength(gen));
const licenses = listFiles("/usr/share/common-licenses", () => true);
const perl = listFiles("/usr/share/perl", (p) => /\.(pm|pod)$/.test(p));
const headers = listFiles("/usr/include", (p) => /\.h$/.test(p));
let text = [
  take(licenses, Math.floor(rest * 0.3)),
  take(perl, Math.floor(rest * 0.35)),
  take(headers, Math.floor(rest * 0.35)),
].join("\n");
// a machine short of one source gets the shortfall from the others
if (Buffer.byteLength(text) < rest) text += "\n" + take(headers.concat(perl).reverse(), rest - Buffer.byteLength(text));
const corpus = text + "\n" + gen + "\n";
fs.writeFileSync(outPath, corpus, "utf8");
const size = Buffer.byteLength(corpus);
if (size < target) {
  process.stderr.write(`make_corpus.js: only ${size} bytes of text found (wanted ${target})\n`);
  process.exit(1);
}

if (invalidPath) {
  // each line holds invalid UTF-8 of one kind, around valid text
  const bad = [
    [0x80], [0xbf], [0xc0, 0xaf], [0xc1, 0xbf], [0xe0, 0x80, 0xaf], [0xed, 0xa0, 0x80], [0xed, 0xbf, 0xbf],
    [0xf0, 0x8f, 0xbf, 0xbf], [0xf4, 0x90, 0x80, 0x80], [0xf5], [0xff], [0xfe], [0xe4, 0xbd], [0xf0, 0x9f, 0x98],
    [0xc3], [0xe4], [0xf0, 0x9f], [0xe4, 0xbd, 0x41], [0xc3, 0xc3, 0xa9], [0xf0, 0x9f, 0x98, 0x80, 0x80],
  ];
  const parts = [];
  for (const b of bad) {
    parts.push(Buffer.from("abc "), Buffer.from(b), Buffer.from(" 你好"), Buffer.from(b), Buffer.from("\n"));
    parts.push(Buffer.from(b), Buffer.from("\n"));
    parts.push(Buffer.from("x"), Buffer.from(b), Buffer.from(b), Buffer.from("123"), Buffer.from(b), Buffer.from("\n"));
  }
  fs.writeFileSync(invalidPath, Buffer.concat(parts));
}
process.stdout.write(`${size}\n`);
