// fanpipe's page: send files or text to a pipe (one XHR upload, its progress, then the
// pipe's live state from GET /NAME?progress), or receive from one (a plain link with
// ?download), with the curl commands of the other side. No framework, no build step.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const origin = location.origin;
  const enc = new TextEncoder();

  const pathOf = (name) =>
    '/' + name.replace(/^\/+/, '').split('/').map(encodeURIComponent).join('/');
  const nOf = (input) => {
    const n = parseInt(input.value, 10);
    return n >= 1 ? n : 1;
  };
  const quote = (s) => "'" + s.replace(/'/g, "'\\''") + "'";
  const pipeUrl = (name, n) => origin + pathOf(name) + '?n=' + n;
  const size = (b) => {
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
    return (i ? b.toFixed(1) : String(b)) + ' ' + units[i];
  };
  const randomName = () => {
    const a = new Uint8Array(6);
    crypto.getRandomValues(a);
    return 'p-' + Array.from(a, (b) => (b % 36).toString(36)).join('');
  };
  const lastSegment = (name) => name.split('/').filter(Boolean).pop() || 'pipe';

  // --- several files as one ustar archive (pax records for long or non-ASCII names and
  // sizes over 8 GiB); the files themselves are Blob parts, never read into memory.
  const octal = (n, len) => n.toString(8).padStart(len - 1, '0');
  function tarHeader(name, bytes, type, mtime) {
    const h = new Uint8Array(512);
    const put = (off, len, s) => h.set(enc.encode(s).subarray(0, len), off);
    put(0, 99, name);
    put(100, 7, '0000644');
    put(108, 7, '0000000');
    put(116, 7, '0000000');
    put(124, 11, octal(bytes, 12));
    put(136, 11, octal(mtime, 12));
    put(156, 1, type);
    put(257, 5, 'ustar');
    put(263, 2, '00');
    h.fill(32, 148, 156);
    let sum = 0;
    for (const b of h) sum += b;
    put(148, 6, octal(sum, 7));
    h[154] = 0;
    return h;
  }
  function paxRecord(key, value) {
    const body = ' ' + key + '=' + value + '\n';
    const len = enc.encode(body).length;
    let digits = 1;
    while (String(len + digits).length !== digits) digits++;
    return String(len + digits) + body;
  }
  const padding = (n) => new Uint8Array((512 - (n % 512)) % 512);
  function tarBlob(files) {
    const parts = [];
    for (const f of files) {
      const mtime = Math.floor((f.lastModified || Date.now()) / 1000);
      const big = f.size > 0o77777777777;
      const plain = /^[\x20-\x7e]*$/.test(f.name) && enc.encode(f.name).length < 100;
      if (!plain || big) {
        let pax = paxRecord('path', f.name);
        if (big) pax += paxRecord('size', String(f.size));
        const p = enc.encode(pax);
        parts.push(tarHeader('PaxHeader', p.length, 'x', mtime), p, padding(p.length));
      }
      const ascii = f.name.replace(/[^\x20-\x7e]/g, '_');
      parts.push(tarHeader(ascii, big ? 0 : f.size, '0', mtime), f, padding(f.size));
    }
    parts.push(new Uint8Array(1024));
    return new Blob(parts, { type: 'application/x-tar' });
  }

  // Content-Disposition with an ASCII fallback and the UTF-8 name (RFC 6266, RFC 8187).
  function disposition(name) {
    const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
    let v = 'attachment; filename="' + ascii + '"';
    if (ascii !== name) {
      const pct = encodeURIComponent(name).replace(/['()*]/g,
        (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
      v += "; filename*=UTF-8''" + pct;
    }
    return v;
  }

  // --- what the send form would send
  function payload(name) {
    const files = Array.from($('send-files').files);
    const text = $('send-text').value;
    if (files.length === 1) {
      const f = files[0];
      return { body: f, type: f.type || 'application/octet-stream', filename: f.name,
        kind: 'file', what: 'the file ' + f.name + ' (' + size(f.size) + ')' };
    }
    if (files.length > 1) {
      const tar = tarBlob(files);
      return { body: tar, type: 'application/x-tar', filename: lastSegment(name) + '.tar',
        kind: 'tar', what: files.length + ' files as one tar archive (' + size(tar.size) + ')' };
    }
    if (text) {
      const blob = new Blob([text]);
      return { body: blob, type: 'text/plain; charset=utf-8', filename: null, kind: 'text',
        what: 'the text (' + size(blob.size) + ')' };
    }
    return null;
  }

  function updateSend() {
    const name = $('send-name').value.trim();
    const n = nOf($('send-n'));
    const p = payload(name);
    $('send-what').textContent = p ? 'Sends ' + p.what + '.' : 'Choose files or type text.';
    const url = quote(pipeUrl(name || 'NAME', n));
    let cmd = 'curl -fsS ' + url;
    if (p && p.kind === 'tar') cmd += ' | tar x';
    else if (p && p.kind === 'file') cmd = 'curl -fsS -o ' + quote(p.filename) + ' ' + url;
    $('recv-cmd').textContent = cmd;
  }

  function updateRecv() {
    const name = $('recv-name').value.trim();
    const n = nOf($('recv-n'));
    const filename = $('recv-filename').value.trim();
    let href = pathOf(name || 'NAME') + '?n=' + n + '&download';
    if (filename) href += '&filename=' + encodeURIComponent(filename);
    $('recv-link').href = href;
    $('send-cmd').textContent = 'curl -fsS -T FILE ' + quote(pipeUrl(name || 'NAME', n));
  }

  function status(text, bad) {
    const s = $('send-status');
    s.textContent = text;
    s.classList.toggle('bad', !!bad);
  }

  // --- the pipe's live state
  let source = null;
  // Ends a watch that did not see the end, with the sender's report instead.
  function finish(s, report, ok) {
    s.close();
    source = null;
    const box = $('watch');
    const list = box.dataset.seen ? box.dataset.seen.split(',') : [];
    if (list[list.length - 1] !== 'done') box.dataset.seen = list.concat('done').join(',');
    $('watch-state').textContent = (ok ? 'Done: ' : 'Failed: ') + report.replace(/^\[\w+\] (done: )?/, '');
  }
  function watch(name) {
    if (source) source.close();
    const box = $('watch');
    box.dataset.seen = '';
    $('watch-title').textContent = 'Pipe state: ' + name;
    $('watch-progress').textContent = '';
    const seen = (s) => {
      const list = box.dataset.seen ? box.dataset.seen.split(',') : [];
      if (list[list.length - 1] !== s) list.push(s);
      box.dataset.seen = list.join(',');
    };
    const say = (t) => { $('watch-state').textContent = t; };
    source = new EventSource(pathOf(name) + '?progress');
    source.name = name;
    source.addEventListener('state', (ev) => {
      const s = JSON.parse(ev.data);
      seen(s.state);
      if (s.state === 'waiting') {
        say('Waiting: ' + s.receivers + ' of ' + s.n + ' receiver(s) here, sender ' +
          (s.sender ? 'here.' : 'not here yet.'));
      } else if (s.state === 'sending') {
        say('Sending to ' + s.receivers + ' of ' + s.n + ' receiver(s).');
      } else {
        say('No pipe named ' + name + ' now; watching for one.');
      }
    });
    source.addEventListener('progress', (ev) => {
      const p = JSON.parse(ev.data);
      $('watch-progress').textContent = size(p.bytes) +
        (p.total !== null ? ' of ' + size(p.total) : '') + ' sent, ' + size(p.rate) + '/s';
    });
    source.addEventListener('done', (ev) => {
      const d = JSON.parse(ev.data);
      seen('done');
      source.close();
      source = null;
      say(d.outcome === 'complete'
        ? 'Done: ' + size(d.bytes) + ' to ' + d.complete + ' of ' + d.n + ' receiver(s) in ' +
          d.seconds.toFixed(2) + ' s.'
        : 'Failed (' + d.outcome.replace(/_/g, ' ') + '): ' + d.complete + ' of ' + d.n +
          ' receiver(s) got every byte.');
    });
  }

  // --- sending: one XHR with a File or Blob body (browsers stream request bodies only
  // over HTTP/2, so no streamed upload); report=end: one answer when it is over.
  $('send').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $('send-name').value.trim().replace(/^\/+/, '');
    if (!name) { status('Choose a pipe name.', true); $('send-name').focus(); return; }
    const n = nOf($('send-n'));
    const p = payload(name);
    if (!p) { status('Choose files or type text.', true); $('send-files').focus(); return; }
    const bar = $('send-progress');
    const go = $('send-go');
    bar.hidden = false;
    bar.value = 0;
    go.disabled = true;
    status('Uploading ' + p.what + ' to ' + name + '...');
    const xhr = new XMLHttpRequest();
    xhr.open('PUT', pathOf(name) + '?n=' + n + '&report=end');
    xhr.setRequestHeader('Content-Type', p.type);
    if (p.filename) xhr.setRequestHeader('Content-Disposition', disposition(p.filename));
    // The pipe is watched once the upload has begun (its head is at the server by then),
    // so that the watcher finds the pipe this upload opens.
    let watching = false;
    const startWatch = () => { if (!watching) { watching = true; watch(name); } };
    const fallback = setTimeout(startWatch, 400);
    xhr.upload.addEventListener('progress', (ev) => {
      startWatch();
      if (ev.lengthComputable) { bar.max = ev.total || 1; bar.value = ev.loaded; }
    });
    xhr.upload.addEventListener('load', startWatch);
    xhr.addEventListener('load', () => {
      const lines = xhr.responseText.trim().split('\n');
      const last = lines[lines.length - 1] || '';
      status((xhr.status === 200 ? 'Sent. ' : 'Not sent whole (' + xhr.status + '). ') + last,
        xhr.status !== 200);
      // The sender's report is the last word if the watch missed the end (a transfer
      // over before the watcher came).
      setTimeout(() => {
        if (source && source.name === name) finish(source, last, xhr.status === 200);
      }, 1500);
    });
    xhr.addEventListener('loadend', () => clearTimeout(fallback));
    xhr.addEventListener('error', () => status('The upload failed: the connection was cut.', true));
    xhr.addEventListener('loadend', () => { go.disabled = false; });
    xhr.send(p.body);
  });

  $('recv-link').addEventListener('click', (e) => {
    const name = $('recv-name').value.trim();
    if (!name) { e.preventDefault(); $('recv-name').focus(); return; }
    watch(name);
  });

  document.querySelectorAll('button.copy').forEach((b) => b.addEventListener('click', () => {
    const pre = $(b.dataset.copy);
    const done = (label) => {
      b.textContent = label;
      setTimeout(() => { b.textContent = 'Copy'; }, 1500);
    };
    const select = () => {
      const r = document.createRange();
      r.selectNodeContents(pre);
      getSelection().removeAllRanges();
      getSelection().addRange(r);
      done('Selected');
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(pre.textContent).then(() => done('Copied'), select);
    } else {
      select();
    }
  }));

  for (const id of ['send-name', 'send-n', 'send-files', 'send-text']) {
    $(id).addEventListener('input', updateSend);
    $(id).addEventListener('change', updateSend);
  }
  for (const id of ['recv-name', 'recv-n', 'recv-filename']) {
    $(id).addEventListener('input', updateRecv);
  }
  $('send-name').value = randomName();
  $('origin').textContent = origin;
  updateSend();
  updateRecv();
})();
