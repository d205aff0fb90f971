// clt-lens workbench for circuit-tracer's attribution-graph viewer (written for clt-lens).
//
// On the graph page (index.html) it adds:
// - an "Intervene" drawer: collect feature nodes (the clicked node, the pinned nodes, or a
//   supernode), ablate / scale / clamp them, freeze attention and norms or not, run on the
//   graph's prompt or steer another prompt, and read the next-token probabilities, the graph's
//   output logits, the graph features that changed most and greedy continuations, before and
//   after. Requests go to POST /api/intervene (clt_lens.circuits.intervene on the server).
// - in the feature panel: autointerp scores, decoder norms per target layer, "intervene",
//   "steer with this feature" and a link to the feature's own page (feature.html);
// - the message of a missing feature page (the server answers 404 with an "error");
// - saved pins and supernodes restored when a graph loads (the bundled page keeps only what
//   is in the URL, so a saved supernode was lost on reload).
// feature.html reuses cltWorkbench.api / renderResult. No dependencies (vanilla DOM).
(function () {
  'use strict';

  var wb = window.cltWorkbench = {
    ctx: null,        // {visState, renderAll, data} of the graph on screen
    slug: null,
    status: null,     // GET /api/workbench/{slug}
    targets: [],      // [{layer, feature, position, nodeId, label}]
    lastResult: null,
  };

  // -- small helpers ---------------------------------------------------------------------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(function (kv) {
      var k = kv[0], v = kv[1];
      if (v === undefined || v === null || v === false) return;
      if (k === 'text') node.textContent = v;
      else if (k === 'cls') node.className = v;
      else if (k.slice(0, 2) === 'on') node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : v);
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.append(c);
    });
    return node;
  }
  function fmt(x, digits) {
    if (typeof x !== 'number' || !isFinite(x)) return '–';
    return x.toFixed(digits === undefined ? 3 : digits);
  }
  function pct(x) { return typeof x === 'number' ? (100 * x).toFixed(1) + '%' : '–'; }
  function signed(x, digits) { return (x > 0 ? '+' : '') + fmt(x, digits); }
  function tok(t) {
    return '"' + String(t).replace(/\n/g, '⏎').replace(/\t/g, '→').replace(/\r/g, '↵') + '"';
  }
  wb.tok = tok;
  wb.el = el;

  wb.api = async function (path, body) {
    var init = body === undefined ? {cache: 'no-store'} : {
      method: 'POST', cache: 'no-store',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
    };
    var res = await fetch(path, init);
    var data;
    try { data = await res.json(); } catch (e) { data = {error: 'HTTP ' + res.status}; }
    if (!res.ok) {
      var err = new Error(data.error || ('HTTP ' + res.status));
      err.status = res.status;
      throw err;
    }
    return data;
  };

  // -- results (shared with feature.html) ------------------------------------------------------
  function describe(iv) {
    var what = 'L' + iv.layer + ' #' + iv.feature + ' ' +
      (iv.position === 'all' ? 'at every token' : '@ ' + tok(iv.token) + ' (pos ' + iv.position + ')');
    var op = iv.op === 'ablate' ? 'ablate' : iv.op === 'scale' ? 'scale ×' + fmt(iv.value, 2)
      : 'clamp to ' + fmt(iv.value, 3) + (iv.unit_value ? ' (' + fmt(iv.unit_value.multiple, 2) +
        ' × max ' + fmt(iv.unit_value.max_activation, 3) + ')' : '');
    return op + ': ' + what + ' (was ' + fmt(iv.activation_before, 3) + ')';
  }

  function probTable(cls, title, rows, sortKey) {
    var other = sortKey === 'prob_before' ? 'prob_after' : 'prob_before';
    var max = Math.max.apply(null, rows.map(function (r) { return r[sortKey]; }).concat([1e-9]));
    return el('div', {cls: 'clt-wb-table-box ' + cls}, [
      el('div', {cls: 'clt-wb-subtitle', text: title}),
      el('table', {cls: 'clt-wb-table'}, [
        el('thead', {}, [el('tr', {}, [el('th', {text: 'token'}),
          el('th', {text: sortKey === 'prob_before' ? 'p before' : 'p after'}),
          el('th', {text: sortKey === 'prob_before' ? 'after' : 'before'})])]),
        el('tbody', {}, rows.map(function (r) {
          var bar = el('span', {cls: 'clt-wb-bar'});
          bar.style.width = (60 * r[sortKey] / max).toFixed(1) + 'px';
          return el('tr', {'data-token-id': r.id, 'data-prob-before': r.prob_before,
                           'data-prob-after': r.prob_after}, [
            el('td', {cls: 'clt-wb-token', text: tok(r.token)}),
            el('td', {}, [bar, el('span', {text: ' ' + pct(r[sortKey])})]),
            el('td', {cls: 'clt-wb-muted', text: pct(r[other])}),
          ]);
        })),
      ]),
    ]);
  }

  function continuation(label, cont, promptTail) {
    return el('div', {cls: 'clt-wb-cont'}, [
      el('span', {cls: 'clt-wb-muted', text: label + ' '}),
      el('span', {cls: 'clt-wb-muted', text: promptTail}),
      el('b', {text: cont.text || '(nothing)'}),
    ]);
  }

  wb.renderResult = function (container, r) {
    container.innerHTML = '';
    var settings = r.direct_only ? 'direct effects only (attention, norms and MLPs frozen)'
      : r.freeze ? 'attention patterns and norms frozen' : 'attention patterns and norms recomputed';
    var head = el('div', {cls: 'clt-wb-summary'}, [
      el('div', {text: (r.graph_prompt ? 'On the graph\'s prompt' : 'On ' + tok(r.prompt)) +
        ' · ' + settings + ' · KL(before‖after) ' + fmt(r.kl, 4) + ' nats · ' +
        fmt(r.request_seconds || r.seconds, 2) + ' s'}),
      el('ul', {cls: 'clt-wb-ivs'}, r.interventions.map(function (iv) {
        return el('li', {text: describe(iv)});
      })),
    ]);
    container.append(head);
    container.append(el('div', {cls: 'clt-wb-tables'}, [
      probTable('clt-wb-top-before', 'Next token, before', r.top_before, 'prob_before'),
      probTable('clt-wb-top-after', 'Next token, after', r.top_after, 'prob_after'),
    ]));
    if (r.logit_changes && r.logit_changes.length) {
      container.append(el('div', {cls: 'clt-wb-subtitle', text: 'The graph\'s output logits'}));
      container.append(el('table', {cls: 'clt-wb-table clt-wb-logits'}, [
        el('thead', {}, [el('tr', {}, ['token', 'logit before', 'after', 'Δ', 'p before', 'after']
          .map(function (h) { return el('th', {text: h}); }))]),
        el('tbody', {}, r.logit_changes.map(function (c) {
          return el('tr', {'data-token-id': c.id}, [
            el('td', {cls: 'clt-wb-token', text: tok(c.token)}), el('td', {text: fmt(c.logit_before)}),
            el('td', {text: fmt(c.logit_after)}),
            el('td', {cls: c.delta_logit < 0 ? 'clt-wb-neg' : 'clt-wb-pos', text: signed(c.delta_logit)}),
            el('td', {text: pct(c.prob_before)}), el('td', {text: pct(c.prob_after)}),
          ]);
        })),
      ]));
    }
    var changed = (r.watched || []).filter(function (w) {
      return Math.abs(w.pre_after - w.pre_before) > 1e-6;
    }).sort(function (a, b) {
      return Math.abs(b.pre_after - b.pre_before) - Math.abs(a.pre_after - a.pre_before);
    });
    if (r.watched && r.watched.length) {
      container.append(el('div', {cls: 'clt-wb-subtitle',
        text: 'Graph features that changed: ' + changed.length + ' of ' + r.watched.length +
              (changed.length > 10 ? ' (the 10 largest)' : '')}));
      changed = changed.slice(0, 10);
      container.append(el('table', {cls: 'clt-wb-table clt-wb-watched'}, [
        el('thead', {}, [el('tr', {}, ['feature', 'activation before', 'after', 'Δ pre-activation']
          .map(function (h) { return el('th', {text: h}); }))]),
        el('tbody', {}, changed.map(function (w) {
          return el('tr', {'data-node-id': w.node_id}, [
            el('td', {text: 'L' + w.layer + ' #' + w.feature + ' @ ' + tok(w.token)}),
            el('td', {text: fmt(w.before)}), el('td', {text: fmt(w.after)}),
            el('td', {cls: w.pre_after < w.pre_before ? 'clt-wb-neg' : 'clt-wb-pos',
                      text: signed(w.pre_after - w.pre_before)}),
          ]);
        })),
      ]));
    }
    if (r.max_new_tokens > 0) {
      var tail = r.prompt_tokens.slice(-6).join('').replace(/\n/g, '⏎');
      container.append(el('div', {cls: 'clt-wb-subtitle',
        text: 'Greedy continuation (' + r.max_new_tokens + ' tokens)'}));
      container.append(continuation('before:', r.continuation_before, '…' + tail));
      container.append(continuation('after:', r.continuation_after, '…' + tail));
    }
    container.append(el('details', {cls: 'clt-wb-python'}, [
      el('summary', {text: 'the same run in Python'}), el('pre', {text: pythonCall(r)})]));
  };

  function pythonCall(r) {
    var py = function (x) { return x === true ? 'True' : x === false ? 'False' : JSON.stringify(x); };
    var ivs = r.interventions.map(function (iv) {
      return '    Intervention(layer=' + iv.layer + ', feature=' + iv.feature + ', position=' +
        (iv.position === 'all' ? 'None' : iv.position) + ', op=' + py(iv.op) +
        (iv.op === 'ablate' ? '' : ', value=' + iv.value) + '),';
    });
    return [
      'from clt_lens.circuits import Intervention, intervene, load_replacement_model',
      'rm = load_replacement_model(' + py(r.transcoders) + ', ' + py(r.model) + ')',
      'prompt = ' + (r.graph_prompt ? py(r.prompt_ids) + '  # the graph\'s tokens, BOS first'
                                    : py(r.prompt)),
      'r = intervene(rm, prompt, [',
    ].concat(ivs).concat([
      '], freeze=' + py(r.freeze) + ', direct_only=' + py(r.direct_only) +
        ', max_new_tokens=' + r.max_new_tokens + ')',
    ]).join('\n');
  }

  // Everything below is for the graph page; feature.html has no viewer scripts.
  if (!window.initCg || !window.util) return;

  // -- saved view state ------------------------------------------------------------------------
  var SAVED_KEYS = ['pinnedIds', 'supernodes', 'sg_pos', 'clerps', 'linkType'];
  var restoredSlug = null;

  async function restoreSaved(slug) {
    if (restoredSlug !== null && restoredSlug !== slug) {
      // another graph: the URL still holds the previous graph's selection
      SAVED_KEYS.concat(['clickedId']).forEach(function (k) { util.params.set(k, null); });
    }
    restoredSlug = slug;
    var data = await util.getFile('./graph_data/' + slug + '.json');
    var saved = data.qParams || {};
    SAVED_KEYS.forEach(function (k) {
      var v = saved[k];
      if (util.params.get(k) || v === undefined || v === null || v === '') return;
      if (Array.isArray(v)) {
        if (!v.length) return;
        v = k === 'pinnedIds' ? v.join(',') : JSON.stringify(v);
      }
      if (typeof v === 'string' && v !== '[]') util.params.set(k, v);
    });
  }

  var origInitCg = window.initCg;
  window.initCg = async function (sel, slug) {
    try { await restoreSaved(slug); } catch (e) { console.warn('clt-lens: saved state', e); }
    var out = await origInitCg.apply(this, arguments);
    onGraph(slug);
    return out;
  };

  var origSubgraph = window.initCgSubgraph;
  window.initCgSubgraph = function (args) {
    var out = origSubgraph.apply(this, arguments);
    wb.ctx = args;
    args.renderAll.clickedId.fns.push(refreshSelection);
    args.renderAll.pinnedIds.fns.push(refreshSelection);
    return out;
  };

  var origDetail = window.initCgFeatureDetail;
  window.initCgFeatureDetail = async function (args) {
    var out = await origDetail.apply(this, arguments);
    var render = function () { featureBlock(args); };
    ['clickedId', 'hoveredId', 'hClerpUpdate', 'pinnedIds'].forEach(function (k) {
      args.renderAll[k].fns.push(render);
    });
    render();
    return out;
  };

  var origList = window.initFeatureExamplesList;
  window.initFeatureExamplesList = function (args) {
    var out = origList.apply(this, arguments);
    args.renderAll.feature.fns.push(function () {
      var f = args.visState.feature;
      var list = args.sel.node().querySelector('.feature-example-list');
      if (f && f.isDead && f.error && list) {
        list.innerHTML = '';
        list.append(el('div', {cls: 'clt-wb-feature-error', text: f.error}));
      }
    });
    return out;
  };

  // -- graph nodes -----------------------------------------------------------------------------
  function nodeById(id) {
    return wb.ctx && wb.ctx.data.nodes.find(function (n) { return n.nodeId === id; });
  }
  function isFeature(n) { return n && n.feature_type === 'cross layer transcoder'; }
  function featureOf(n) {
    var parts = String(n.nodeId).split('_');
    return {layer: +parts[0], feature: +parts[1], position: +parts[2]};
  }
  function tokenAt(pos) {
    var toks = wb.ctx && wb.ctx.data.metadata.prompt_tokens;
    return toks ? toks[pos] : '';
  }
  function nodeLabel(n) {
    var f = featureOf(n);
    return 'L' + f.layer + ' #' + f.feature + ' @ ' + tok(tokenAt(f.position)) +
      (n.ppClerp ? ' · ' + n.ppClerp : '');
  }
  function supernodes() {
    var sn = wb.ctx && wb.ctx.visState.subgraph && wb.ctx.visState.subgraph.supernodes;
    return Array.isArray(sn) ? sn : [];
  }

  function addNodes(ids, source) {
    var skipped = 0, added = 0;
    ids.forEach(function (id) {
      var n = nodeById(id);
      if (!isFeature(n)) { skipped += 1; return; }
      if (wb.targets.some(function (t) { return t.nodeId === id; })) return;
      var f = featureOf(n);
      wb.targets.push({layer: f.layer, feature: f.feature, position: f.position, nodeId: id,
                       label: nodeLabel(n)});
      added += 1;
    });
    var msg = added ? '' : 'nothing added from ' + source;
    if (skipped) msg = (added ? 'added ' + added + '; ' : '') + 'skipped ' + skipped +
      ' node(s) that are not transcoder features (error, token and logit nodes cannot be set)';
    note(msg);
    renderTargets();
  }
  wb.addNodes = addNodes;

  wb.addFeature = function (layer, feature, position, label) {
    var id = layer + '_' + feature + '_' + position;
    if (!wb.targets.some(function (t) { return t.nodeId === id; })) {
      wb.targets.push({layer: layer, feature: feature, position: position, nodeId: id,
                       label: label || ('L' + layer + ' #' + feature)});
    }
    renderTargets();
  };

  // -- the drawer ------------------------------------------------------------------------------
  var ui = null;

  function radio(name, value, label, checked) {
    return el('label', {cls: 'clt-wb-radio'}, [
      el('input', {type: 'radio', name: name, value: value, checked: checked}), ' ' + label]);
  }
  function checked(name) {
    var input = ui.panel.querySelector('input[name="' + name + '"]:checked');
    return input && input.value;
  }

  function buildPanel() {
    var panel = el('div', {cls: 'clt-wb-panel', role: 'complementary'});
    ui = {panel: panel};
    ui.status = el('div', {cls: 'clt-wb-status'});
    ui.targets = el('div', {cls: 'clt-wb-targets'});
    ui.note = el('div', {cls: 'clt-wb-note'});
    ui.groups = el('div', {cls: 'clt-wb-groups'});
    ui.error = el('div', {cls: 'clt-wb-error', hidden: true});
    ui.result = el('div', {cls: 'clt-wb-result'});
    ui.run = el('button', {cls: 'clt-wb-run', text: 'Run', onclick: run});
    ui.prompt = el('textarea', {cls: 'clt-wb-prompt', rows: 2,
      placeholder: 'another prompt to steer (BOS is added)'});
    ui.positions = el('input', {cls: 'clt-wb-positions', type: 'text', placeholder: 'e.g. 1, 3, -1'});
    ui.nTokens = el('input', {cls: 'clt-wb-ntokens', type: 'number', min: 0, value: 10});
    ui.scale = el('input', {cls: 'clt-wb-scale', type: 'number', step: 'any', value: 2});
    ui.clamp = el('input', {cls: 'clt-wb-clamp', type: 'number', step: 'any', value: 1});
    ui.unit = el('select', {cls: 'clt-wb-unit'}, [
      el('option', {value: 'max_activation', text: '× max activation'}),
      el('option', {value: 'absolute', text: 'absolute'})]);
    ui.freeze = el('input', {type: 'checkbox', cls: 'clt-wb-freeze', checked: true});
    ui.direct = el('input', {type: 'checkbox', cls: 'clt-wb-direct'});
    ui.direct.addEventListener('change', function () {
      if (ui.direct.checked) ui.freeze.checked = true;
    });
    ui.freeze.addEventListener('change', function () {
      if (!ui.freeze.checked) ui.direct.checked = false;
    });

    panel.append(
      el('div', {cls: 'clt-wb-head'}, [
        el('b', {text: 'Intervene'}),
        el('a', {href: './help.html', target: '_blank', text: 'help'}),
        el('button', {cls: 'clt-wb-close', text: '×', title: 'close', onclick: toggle})]),
      ui.status,
      el('div', {cls: 'clt-wb-section'}, [
        el('div', {cls: 'clt-wb-subtitle', text: 'Features'}),
        el('div', {cls: 'clt-wb-buttons'}, [
          el('button', {cls: 'clt-wb-add-clicked', text: '+ clicked node', onclick: function () {
            var id = wb.ctx && wb.ctx.visState.clickedId;
            addNodes(id ? [id] : [], 'the clicked node (click a feature node first)');
          }}),
          el('button', {cls: 'clt-wb-add-pinned', text: '+ pinned nodes', onclick: function () {
            addNodes((wb.ctx && wb.ctx.visState.pinnedIds) || [],
                     'the pinned nodes (ctrl/⌘-click nodes to pin them)');
          }}),
          el('button', {cls: 'clt-wb-clear', text: 'clear', onclick: function () {
            wb.targets = []; renderTargets(); note('');
          }})]),
        ui.groups, ui.targets, ui.note]),
      el('div', {cls: 'clt-wb-section'}, [
        el('div', {cls: 'clt-wb-subtitle', text: 'Set them to'}),
        el('div', {}, [radio('clt-wb-op', 'ablate', 'ablate (0)', true)]),
        el('div', {}, [radio('clt-wb-op', 'scale', 'scale ×', false), ' ', ui.scale]),
        el('div', {}, [radio('clt-wb-op', 'clamp', 'clamp to', false), ' ', ui.clamp, ' ', ui.unit]),
        el('label', {cls: 'clt-wb-check'}, [ui.freeze,
          ' freeze attention patterns and norms (the graph\'s setting)']),
        el('label', {cls: 'clt-wb-check'}, [ui.direct,
          ' direct effects only (freeze MLPs too: what the graph\'s edges measure)'])]),
      el('div', {cls: 'clt-wb-section'}, [
        el('div', {cls: 'clt-wb-subtitle', text: 'Prompt'}),
        el('div', {}, [radio('clt-wb-mode', 'graph', 'the graph\'s prompt (features at their nodes\' positions)', true)]),
        el('div', {}, [radio('clt-wb-mode', 'steer', 'another prompt (steer):', false)]),
        ui.prompt,
        el('div', {cls: 'clt-wb-indent'}, [radio('clt-wb-pos', 'all', 'at every token, generated ones too', true)]),
        el('div', {cls: 'clt-wb-indent'}, [radio('clt-wb-pos', 'list', 'at positions', false), ' ', ui.positions]),
        el('label', {}, ['continue greedily for ', ui.nTokens, ' tokens'])]),
      el('div', {cls: 'clt-wb-section'}, [ui.run, ui.error]),
      ui.result);
    ui.prompt.addEventListener('focus', function () {
      panel.querySelector('input[name="clt-wb-mode"][value="steer"]').checked = true;
    });
    ui.positions.addEventListener('focus', function () {
      panel.querySelector('input[name="clt-wb-pos"][value="list"]').checked = true;
    });
    document.body.append(panel);
    // supernodes change on key-up of the "g" grouping gesture and on the × of a group
    document.body.addEventListener('keyup', function () { setTimeout(renderGroups, 0); });
    document.body.addEventListener('click', function () { setTimeout(renderGroups, 0); });
  }

  function note(msg) { if (ui) ui.note.textContent = msg || ''; }

  function renderGroups() {
    if (!ui) return;
    ui.groups.innerHTML = '';
    supernodes().forEach(function (sn, i) {
      var label = sn[0], ids = sn.slice(1);
      ui.groups.append(el('button', {cls: 'clt-wb-add-group', 'data-group': i,
        text: '+ group "' + label + '" (' + ids.length + ')',
        onclick: function () { addNodes(ids, 'group ' + label); }}));
    });
  }

  function renderTargets() {
    if (!ui) return;
    ui.targets.innerHTML = '';
    if (!wb.targets.length) {
      ui.targets.append(el('div', {cls: 'clt-wb-muted',
        text: 'Click a feature node, ctrl/⌘-click to pin several, or hold "g" and click ' +
              'nodes of the subgraph to group them; then add them here.'}));
    }
    wb.targets.forEach(function (t, i) {
      ui.targets.append(el('div', {cls: 'clt-wb-target', 'data-node-id': t.nodeId}, [
        el('button', {cls: 'clt-wb-remove', text: '×', title: 'remove', onclick: function () {
          wb.targets.splice(i, 1); renderTargets();
        }}),
        el('span', {text: ' ' + t.label})]));
    });
    renderGroups();
    updateRun();
  }

  function refreshSelection() { renderGroups(); }

  function updateRun() {
    if (!ui) return;
    var s = wb.status;
    ui.run.disabled = !(s && s.available) || !wb.targets.length;
  }

  async function loadStatus(slug) {
    ui.status.textContent = 'checking…';
    try {
      var s = await wb.api('./api/workbench/' + encodeURIComponent(slug));
      wb.status = s;
      ui.nTokens.max = s.limits.max_new_tokens;
      ui.nTokens.value = Math.min(+ui.nTokens.value || s.default_new_tokens, s.limits.max_new_tokens);
      ui.status.className = 'clt-wb-status' + (s.available ? '' : ' clt-wb-unavailable');
      ui.status.textContent = s.available
        ? 'model ' + s.model + ' · transcoders ' + s.transcoders.split('/').slice(-2).join('/') +
          (s.loaded ? ' (loaded)' : ' (load on the first run)')
        : s.reason;
    } catch (e) {
      wb.status = null;
      ui.status.className = 'clt-wb-status clt-wb-unavailable';
      ui.status.textContent = e.message;
    }
    updateRun();
  }

  function request() {
    var op = checked('clt-wb-op');
    var mode = checked('clt-wb-mode');
    var base = {op: op};
    if (op === 'scale') base.value = +ui.scale.value;
    if (op === 'clamp') { base.value = +ui.clamp.value; base.unit = ui.unit.value; }
    var req = {slug: wb.slug, freeze: ui.freeze.checked, direct_only: ui.direct.checked,
               max_new_tokens: +ui.nTokens.value, interventions: []};
    if (mode === 'graph') {
      req.prompt = null;
      req.interventions = wb.targets.map(function (t) {
        return Object.assign({layer: t.layer, feature: t.feature, position: t.position}, base);
      });
    } else {
      req.prompt = ui.prompt.value;
      var positions = ['all'];
      if (checked('clt-wb-pos') === 'list') {
        positions = ui.positions.value.split(/[\s,]+/).filter(Boolean).map(Number);
        if (!positions.length || positions.some(function (p) { return !Number.isInteger(p); })) {
          throw new Error('positions must be whole numbers separated by commas');
        }
      }
      var seen = {};
      wb.targets.forEach(function (t) {
        var key = t.layer + '_' + t.feature;
        if (seen[key]) return;
        seen[key] = 1;
        positions.forEach(function (p) {
          req.interventions.push(Object.assign({layer: t.layer, feature: t.feature, position: p}, base));
        });
      });
    }
    return req;
  }

  async function run() {
    ui.error.hidden = true;
    var req;
    try { req = request(); } catch (e) { return showError(e.message); }
    ui.run.disabled = true;
    ui.run.textContent = 'Running…';
    try {
      var r = await wb.api('./api/intervene', req);
      wb.lastResult = r;
      wb.renderResult(ui.result, r);
      loadStatus(wb.slug);
    } catch (e) {
      showError(e.message);
    } finally {
      ui.run.textContent = 'Run';
      updateRun();
    }
  }

  function showError(msg) {
    ui.error.hidden = false;
    ui.error.textContent = msg;
  }

  function toggle(open) {
    var isOpen = typeof open === 'boolean' ? open : !document.body.classList.contains('clt-wb-open');
    document.body.classList.toggle('clt-wb-open', isOpen);
    if (isOpen) renderTargets();
    // the viewer lays its panels out from the page width: let it re-measure
    window.dispatchEvent(new Event('resize'));
  }
  wb.toggle = toggle;

  function onGraph(slug) {
    if (!ui) buildPanel();
    if (wb.slug !== slug) {
      wb.targets = [];
      ui.result.innerHTML = '';
      ui.error.hidden = true;
      note('');
    }
    wb.slug = slug;
    var nav = document.querySelector('.nav');
    if (nav && !nav.querySelector('.clt-wb-toggle')) {
      var save = nav.querySelector('.save-button');
      nav.insertBefore(el('span', {cls: 'clt-wb-nav'}, [
        el('a', {cls: 'clt-wb-help-link', href: './help.html', target: '_blank', text: 'help'}),
        el('button', {cls: 'clt-wb-toggle', text: 'Intervene', onclick: function () { toggle(); }}),
      ]), save || null);
    }
    renderTargets();
    loadStatus(slug);
  }

  // -- the feature panel -----------------------------------------------------------------------
  function scoreText(scores) {
    if (!scores) return '';
    return Object.entries(scores).map(function (kv) {
      var v = kv[1] || {};
      var x = v.balanced_accuracy !== undefined ? v.balanced_accuracy : v.correlation;
      return kv[0] + ' ' + fmt(x, 2);
    }).join(', ');
  }

  function normBars(norms, layer) {
    var max = Math.max.apply(null, norms.concat([1e-9]));
    return el('div', {cls: 'clt-wb-norms'}, norms.map(function (v, j) {
      var bar = el('span', {cls: 'clt-wb-bar'});
      bar.style.width = (50 * v / max).toFixed(1) + 'px';
      return el('div', {title: 'decoder norm into layer ' + (layer + j)},
                [el('span', {cls: 'clt-wb-muted', text: '→L' + (layer + j) + ' '}), bar,
                 el('span', {text: ' ' + fmt(v, 2)})]);
    }));
  }

  async function featureBlock(args) {
    var vs = args.visState, data = args.data;
    var header = args.cgSel.node().querySelector('.feature-detail .feature-header');
    if (!header) return;
    var d = data.nodes.find(function (e) { return e.nodeId === vs.hoveredNodeId; }) ||
            data.nodes.find(function (e) { return e.nodeId === vs.clickedId; });
    header.querySelectorAll('.clt-wb-feature').forEach(function (x) { x.remove(); });
    if (!isFeature(d)) return;
    var f = featureOf(d);
    var block = el('div', {cls: 'clt-wb-feature', 'data-node-id': d.nodeId});
    header.append(block);
    block.append(el('div', {cls: 'clt-wb-buttons'}, [
      el('button', {cls: 'clt-wb-intervene-feature', text: 'intervene', onclick: function () {
        addNodes([d.nodeId], 'this node'); toggle(true);
      }}),
      el('button', {cls: 'clt-wb-steer-feature', text: 'steer with this feature', onclick: function () {
        wb.addFeature(f.layer, f.feature, f.position, nodeLabel(d));
        toggle(true);
        ui.panel.querySelector('input[name="clt-wb-mode"][value="steer"]').checked = true;
        ui.panel.querySelector('input[name="clt-wb-op"][value="clamp"]').checked = true;
        ui.prompt.focus();
      }}),
      el('a', {href: d.url, target: '_blank', text: 'feature page ↗'})]));
    var scan = data.metadata.scan;
    if (!scan || scan.indexOf('./') !== 0) return;
    var page;
    try { page = await util.getFile(scan + '/' + d.featureIndex + '.json'); } catch (e) { return; }
    if (!block.isConnected || !page || page.isDead) return;
    if (page.explanation) {
      block.append(el('div', {cls: 'clt-wb-explanation'}, [
        el('span', {cls: 'clt-wb-muted', text: 'autointerp: '}), page.explanation,
        page.explanation_scores && Object.keys(page.explanation_scores).length
          ? el('span', {cls: 'clt-wb-muted', text: ' (' + scoreText(page.explanation_scores) + ')'})
          : null]));
    }
    if (page.decoder_norms && page.decoder_norms.length) {
      block.append(el('div', {cls: 'clt-wb-muted', text: 'decoder norm per target layer'}));
      block.append(normBars(page.decoder_norms, f.layer));
    }
  }
})();
