// TapML browser runtime: speaks the TapML wire protocol (docs/PROTOCOL.md, profile "gpu") over a WebSocket
// to the host and runs what the host plans: buffers, writes, WGSL compiles, dispatches, reads.
// It holds no kernel logic: every WGSL source and every dispatch's parameters come from the host.
"use strict";

const PROTOCOL = 1;
const PARAM_BYTES = 1024; // the uniform parameter window every kernel sees after its storage bindings
const enc = new TextEncoder();
const dec = new TextDecoder();

// --- frames: u32 LE header length, JSON header (space-padded to 8), blobs each padded to 8 ---------------
function decodeFrame(buf) {
  const dv = new DataView(buf);
  const hlen = dv.getUint32(0, true);
  const header = JSON.parse(dec.decode(new Uint8Array(buf, 4, hlen)));
  const blobs = [];
  let pos = 4 + hlen;
  for (const n of header.blobs || []) {
    blobs.push(new Uint8Array(buf, pos, n));
    pos += n + ((8 - (n % 8)) % 8);
  }
  return [header, blobs];
}

function encodeFrame(header, blobs = []) {
  if (blobs.length) header.blobs = blobs.map((b) => b.byteLength);
  let text = enc.encode(JSON.stringify(header));
  const pad = (8 - ((4 + text.length) % 8)) % 8;
  let total = 4 + text.length + pad;
  for (const b of blobs) total += b.byteLength + ((8 - (b.byteLength % 8)) % 8);
  const out = new Uint8Array(total);
  new DataView(out.buffer).setUint32(0, text.length + pad, true);
  out.set(text, 4);
  out.fill(32, 4 + text.length, 4 + text.length + pad);
  let pos = 4 + text.length + pad;
  for (const b of blobs) {
    out.set(b instanceof Uint8Array ? b : new Uint8Array(b), pos);
    pos += b.byteLength + ((8 - (b.byteLength % 8)) % 8);
  }
  return out;
}

async function hmacHex(key, text) {
  const k = await crypto.subtle.importKey("raw", enc.encode(key), { name: "HMAC", hash: "SHA-256" }, false,
                                          ["sign"]);
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(text)));
  return Array.from(sig, (b) => b.toString(16).padStart(2, "0")).join("");
}

function randomHex(n) {
  return Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- the device ------------------------------------------------------------------------------------------
class Gpu {
  async init() {
    if (!navigator.gpu) throw new Error("navigator.gpu is missing: this browser has WebGPU off");
    this.adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!this.adapter) throw new Error("no WebGPU adapter");
    const lim = this.adapter.limits;
    const want = ["maxStorageBufferBindingSize", "maxBufferSize", "maxComputeWorkgroupStorageSize",
                  "maxStorageBuffersPerShaderStage", "maxComputeInvocationsPerWorkgroup",
                  "maxComputeWorkgroupSizeX", "maxComputeWorkgroupSizeY", "maxComputeWorkgroupsPerDimension"];
    const requiredLimits = {};
    for (const k of want) requiredLimits[k] = lim[k];
    const requiredFeatures = ["shader-f16", "timestamp-query"].filter((f) => this.adapter.features.has(f));
    this.device = await this.adapter.requestDevice({ requiredFeatures, requiredLimits });
    this.device.lost.then((info) => { this.lost = `device lost: ${info.reason} ${info.message}`; });
    this.queue = this.device.queue;
    this.buffers = new Map();
    this.kernels = new Map();
    this.layouts = new Map();
    this.groups = new Map();
    this.arena = null;
    this.arenaSize = 0;
  }

  info() {
    const a = this.adapter.info || {};
    const limits = {};
    for (const k in this.device.limits) limits[k] = this.device.limits[k];
    return { vendor: a.vendor || "", architecture: a.architecture || "", description: a.description || "",
             device: a.device || "", fallback: !!(a.isFallbackAdapter || this.adapter.isFallbackAdapter),
             features: [...this.device.features], limits, userAgent: navigator.userAgent };
  }

  layout(bindings) {
    let got = this.layouts.get(bindings);
    if (!got) {
      const entries = [...bindings].map((b, i) => ({ binding: i, visibility: GPUShaderStage.COMPUTE,
        buffer: { type: b === "w" ? "storage" : "read-only-storage" } }));
      entries.push({ binding: bindings.length, visibility: GPUShaderStage.COMPUTE,
                     buffer: { type: "uniform", hasDynamicOffset: true, minBindingSize: PARAM_BYTES } });
      const bgl = this.device.createBindGroupLayout({ entries });
      got = { bgl, pl: this.device.createPipelineLayout({ bindGroupLayouts: [bgl] }) };
      this.layouts.set(bindings, got);
    }
    return got;
  }

  async compile(h) {
    const { bgl, pl } = this.layout(h.bindings);
    this.device.pushErrorScope("validation");
    const module = this.device.createShaderModule({ label: h.name, code: h.source });
    const info = await module.getCompilationInfo();
    const errors = info.messages.filter((m) => m.type === "error");
    if (errors.length) {
      await this.device.popErrorScope();
      const m = errors[0];
      throw new Error(`WGSL error at ${m.lineNum}:${m.linePos}: ${m.message}`);
    }
    let pipeline;
    try {
      pipeline = await this.device.createComputePipelineAsync({ layout: pl, compute: { module, entryPoint: "main" } });
    } finally {
      const err = await this.device.popErrorScope();
      if (err) throw new Error(err.message);
    }
    this.kernels.set(h.kernel, { pipeline, bgl, bindings: h.bindings, name: h.name });
    return {};
  }

  bindGroup(k, ids) {
    const key = `${k.bindings}|${ids.join(",")}|${this.arenaGen}`;
    let bg = this.groups.get(key);
    if (!bg) {
      const entries = ids.map((id, i) => {
        const buf = this.buffers.get(id);
        if (!buf) throw new Error(`unknown buffer ${id}`);
        return { binding: i, resource: { buffer: buf, offset: 0, size: buf.size } };
      });
      entries.push({ binding: ids.length, resource: { buffer: this.arena, offset: 0, size: PARAM_BYTES } });
      bg = this.device.createBindGroup({ layout: k.bgl, entries });
      if (this.groups.size > 8192) this.groups.clear();
      this.groups.set(key, bg);
    }
    return bg;
  }

  ensureArena(n) {
    if (this.arena && this.arenaSize >= n) return;
    let size = 1 << 20;
    while (size < n) size *= 2;
    if (this.arena) this.arena.destroy();
    this.arena = this.device.createBuffer({ size, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    this.arenaSize = size;
    this.arenaGen = (this.arenaGen || 0) + 1;
    this.groups.clear();
  }

  // One "gpu" request: commands in order; dispatches between writes share one submission.
  async run(h, blobs) {
    if (this.lost) throw new Error(this.lost);
    const dev = this.device;
    dev.pushErrorScope("out-of-memory");
    dev.pushErrorScope("validation");
    let first = null;
    const fail = (e) => { if (!first) first = e instanceof Error ? e.message : String(e); };
    if (h.params !== undefined) {
      const p = blobs[h.params];
      this.ensureArena(p.byteLength + PARAM_BYTES);
      if (p.byteLength) this.queue.writeBuffer(this.arena, 0, p);
    }
    let encoder = null, pass = null;
    const endPass = () => { if (pass) { pass.end(); pass = null; } };
    const submit = () => { endPass(); if (encoder) { this.queue.submit([encoder.finish()]); encoder = null; } };
    const reads = [], destroys = [];
    for (const c of h.cmds) {
      try {
        switch (c[0]) {
          case "create":
            this.buffers.set(c[1], dev.createBuffer({ size: c[2],
              usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST }));
            break;
          case "destroy":
            destroys.push(c[1]);
            break;
          case "write": {
            submit(); // a queue write runs before commands not yet submitted
            const b = blobs[c[3]];
            this.queue.writeBuffer(this.buffers.get(c[1]), c[2], b.buffer, b.byteOffset, b.byteLength);
            break;
          }
          case "dispatch": {
            const k = this.kernels.get(c[1]);
            if (!k) throw new Error(`unknown kernel ${c[1]}`);
            const bg = this.bindGroup(k, c[2]);
            if (!encoder) encoder = dev.createCommandEncoder();
            if (!pass) pass = encoder.beginComputePass();
            pass.setPipeline(k.pipeline);
            pass.setBindGroup(0, bg, [c[3]]);
            pass.dispatchWorkgroups(c[4], c[5], c[6]);
            break;
          }
          case "read": {
            endPass();
            if (!encoder) encoder = dev.createCommandEncoder();
            const staging = dev.createBuffer({ size: c[3], usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
            encoder.copyBufferToBuffer(this.buffers.get(c[1]), c[2], staging, 0, c[3]);
            reads.push(staging);
            break;
          }
          default:
            throw new Error(`unknown command ${String(c[0]).slice(0, 40)}`);
        }
      } catch (e) {
        fail(e);
      }
    }
    submit();
    const out = [];
    for (const s of reads) {
      try {
        await s.mapAsync(GPUMapMode.READ);
        out.push(new Uint8Array(s.getMappedRange()).slice());
        s.unmap();
      } catch (e) {
        fail(e);
        out.push(new Uint8Array(0));
      }
      s.destroy();
    }
    if (h.sync) await this.queue.onSubmittedWorkDone();
    for (const id of destroys) {
      const b = this.buffers.get(id);
      if (b) { b.destroy(); this.buffers.delete(id); }
    }
    if (destroys.length) this.groups.clear();
    const val = await dev.popErrorScope();
    const oom = await dev.popErrorScope();
    if (val) fail(val.message);
    if (oom) fail(`out of memory: ${oom.message}`);
    if (first) throw new Error(first);
    return [{ reads: out.map((_, i) => i) }, out];
  }
}

// --- the connection --------------------------------------------------------------------------------------
async function main() {
  const token = location.hash.slice(1);
  const status = document.getElementById("status");
  const gpu = new Gpu();
  let initError = null;
  try { await gpu.init(); } catch (e) { initError = String(e && e.message || e); }
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  let nonce = null, cnonce = null, ready = false;
  let chain = Promise.resolve(); // requests run one at a time, in order
  ws.onmessage = (ev) => {
    chain = chain.then(() => onMessage(ev.data)).catch((e) => console.error("tapml:", e));
  };
  ws.onclose = () => { status.textContent = "disconnected"; };
  async function onMessage(data) {
    if (typeof data === "string") return;
    const [h, blobs] = decodeFrame(data);
    if (!ready) {
      if (h.type === "hello") {
        nonce = h.nonce;
        cnonce = randomHex(32);
        const mac = await hmacHex(token, `tapml-auth-v${PROTOCOL}|client|${nonce}|${cnonce}`);
        ws.send(encodeFrame({ type: "auth", protocol: PROTOCOL, cnonce, mac, client: "tapml-browser" }));
      } else if (h.type === "welcome") {
        const want = await hmacHex(token, `tapml-auth-v${PROTOCOL}|server|${nonce}|${cnonce}`);
        if (h.mac !== want) { ws.close(1008, "host failed to prove the token"); return; }
        ready = true;
        status.textContent = initError ? `connected, but ${initError}` : "connected";
      }
      return;
    }
    let reply, out = [];
    try {
      if (initError) throw new Error(initError);
      switch (h.type) {
        case "ping": reply = { pong: h.t }; break;
        case "info": reply = gpu.info(); break;
        case "kernel": reply = await gpu.compile(h); break;
        case "gpu": [reply, out] = await gpu.run(h, blobs); break;
        default: throw new Error(`unknown request type ${String(h.type).slice(0, 40)}`);
      }
      reply.ok = true;
    } catch (e) {
      reply = { ok: false, error: String(e && e.message || e).split("\n")[0].slice(0, 500), kind: "backend" };
      out = [];
    }
    reply.id = h.id;
    ws.send(encodeFrame(reply, out));
  }
}

main();
