"""The d3 additions circuit-tracer's viewer expects, for serving it offline.

The viewer's ``index.html`` loads d3 v7 and a d3-jetpack build (``jetpack_2024-07-20.js``) from
transformer-circuits.pub. That build is not published on a package registry, and the registry's
``d3-jetpack`` 2.3.0 predates d3 v6 events (and its d3 v7 bundle patches a second, unexported
copy of d3-selection), so ``clt-lens serve`` serves this script in its place, after d3 v7.

It implements what the bundled viewer uses, with jetpack's semantics: ``append``/``insert``
accepting ``"tag.class#id"``, ``appendMany(tag, data)``, ``selectAppend``, ``parent``, ``at``
(attributes, camelCase keys to kebab-case), ``st`` (styles, numbers get ``px`` on length
properties), ``translate([x, y] | fn, dim)`` (SVG transform attribute or CSS transform),
``prop``; and ``d3.nestBy``, ``d3.clamp``, ``d3.conventions`` (margins, stacked svg/canvas/div
``layers``, scales, axes, ``drawAxis``) and ``d3.attachTooltip`` with d3 v7 ``(event, d)``
handlers.
"""

JETPACK_COMPAT_JS = r"""// clt-lens: d3-jetpack-style helpers for circuit-tracer's viewer
// (written for clt-lens; see clt_lens/circuits/viewer_compat.py)
(function () {
  'use strict';
  var d3 = window.d3;
  if (!d3 || !d3.selection) { console.error('clt-lens jetpack-compat: load d3 v7 first'); return; }
  var sp = d3.selection.prototype, tp = d3.transition.prototype;

  function parseName(name) {  // "div.a.b#c" -> {tag: "div", attrs: {class: "a b", id: "c"}}
    var parts = name.split(/([.#])/), tag = parts.shift(), classes = [], attrs = {};
    for (var i = 0; i + 1 < parts.length; i += 2) {
      if (parts[i] === '.') classes.push(parts[i + 1]); else attrs.id = parts[i + 1];
    }
    if (classes.length) attrs['class'] = classes.join(' ');
    return {tag: tag, attrs: attrs};
  }
  function withAttrs(sel, attrs) { for (var k in attrs) sel.attr(k, attrs[k]); return sel; }

  var d3Append = sp.append, d3Insert = sp.insert;
  sp.append = function (name) {
    if (typeof name !== 'string') return d3Append.call(this, name);
    var p = parseName(name);
    return withAttrs(d3Append.call(this, p.tag), p.attrs);
  };
  sp.insert = function (name, before) {
    if (typeof name !== 'string') return d3Insert.apply(this, arguments);
    var p = parseName(name);
    return withAttrs(d3Insert.call(this, p.tag, before), p.attrs);
  };
  sp.appendMany = function (name, data) {
    return this.selectAll(null).data(data).enter().append(name);
  };
  sp.selectAppend = function (name) {
    var p = parseName(name), create = d3.creator(p.tag);
    return withAttrs(this.select(function () {
      return this.querySelector(name) || this.appendChild(create.apply(this, arguments));
    }), p.attrs);
  };
  sp.parent = function () {
    var seen = [];
    return this.filter(function () {
      if (seen.indexOf(this.parentNode) > -1) return false;
      seen.push(this.parentNode);
      return true;
    }).select(function () { return this.parentNode; });
  };
  sp.prop = sp.property;

  // SVG attributes whose names stay camelCase; every other camelCase key becomes kebab-case
  var CAMEL_ATTRS = new Set([
    'viewBox', 'preserveAspectRatio', 'refX', 'refY', 'markerWidth', 'markerHeight',
    'markerUnits', 'textLength', 'lengthAdjust', 'pathLength', 'startOffset', 'stdDeviation',
    'gradientUnits', 'gradientTransform', 'patternUnits', 'patternTransform', 'clipPathUnits',
    'maskUnits', 'maskContentUnits', 'filterUnits', 'primitiveUnits', 'spreadMethod',
    'baseFrequency', 'numOctaves', 'tableValues']);
  // styles whose bare numbers mean pixels
  var SIDES = '(-(top|right|bottom|left))?';
  var PX_STYLES = new RegExp('^(top|right|bottom|left|width|height|(min|max)-(width|height)|' +
    'margin' + SIDES + '|padding' + SIDES + '|font-size|line-height|border-radius|' +
    'border' + SIDES + '-width|stroke-width)$');
  function kebab(s) { return s.replace(/([a-z\d])([A-Z])/g, '$1-$2').toLowerCase(); }
  function px(v) { return typeof v === 'number' ? v + 'px' : v; }

  function at(name, value) {
    if (name && typeof name === 'object') {
      for (var k in name) this.attr(CAMEL_ATTRS.has(k) ? k : kebab(k), name[k]);
      return this;
    }
    return arguments.length === 1 ? this.attr(name) : this.attr(name, value);
  }
  function setStyle(sel, name, value) {
    name = kebab(name);
    if (PX_STYLES.test(name)) {
      value = typeof value === 'function'
        ? (function (f) { return function () { return px(f.apply(this, arguments)); }; })(value)
        : px(value);
    }
    return sel.style(name, value);
  }
  function st(name, value) {
    if (name && typeof name === 'object') {
      for (var k in name) setStyle(this, k, name[k]);
      return this;
    }
    return arguments.length === 1 ? this.style(name) : setStyle(this, name, value);
  }
  function translate(xy, dim) {
    var node = this.node();
    if (!node) return this;
    function point(self, args) {
      var p = typeof xy === 'function' ? xy.apply(self, args) : xy;
      return dim === 0 ? [p, 0] : dim === 1 ? [0, p] : p;
    }
    if (node.getBBox) {  // SVG: transform attribute
      return this.attr('transform', function () {
        var p = point(this, arguments);
        return 'translate(' + p[0] + ',' + p[1] + ')';
      });
    }
    return this.style('transform', function () {
      var p = point(this, arguments);
      return 'translate(' + p[0] + 'px,' + p[1] + 'px)';
    });
  }
  sp.at = tp.at = at;
  sp.st = tp.st = st;
  sp.translate = tp.translate = translate;

  d3.clamp = function (lo, value, hi) { return Math.max(lo, Math.min(hi, value)); };

  d3.nestBy = function (array, key) {  // groups in order of first appearance, each with .key
    return d3.groups(array, function (d) { return String(key(d)); }).map(function (g) {
      g[1].key = g[0];
      return g[1];
    });
  };

  d3.conventions = function (c) {
    c = c || {};
    var m = c.margin = c.margin || {};
    ['top', 'right', 'bottom', 'left'].forEach(function (k) {
      if (!m[k] && m[k] !== 0) m[k] = 20;
    });
    if (c.parentSel) c.sel = c.parentSel;
    var node = c.sel && c.sel.node();
    c.totalWidth = c.totalWidth || (node && node.offsetWidth) || 960;
    c.totalHeight = c.totalHeight || (node && node.offsetHeight) || 500;
    c.width = c.width || c.totalWidth - m.left - m.right;
    c.height = c.height || c.totalHeight - m.top - m.bottom;
    c.totalWidth = c.width + m.left + m.right;
    c.totalHeight = c.height + m.top + m.bottom;
    c.sel = c.sel || d3.select('body');
    c.sel.st({position: 'relative', height: c.totalHeight, width: c.totalWidth});
    c.x = c.x || d3.scaleLinear().range([0, c.width]);
    c.y = c.y || d3.scaleLinear().range([c.height, 0]);
    c.xAxis = c.xAxis || d3.axisBottom(c.x);
    c.yAxis = c.yAxis || d3.axisLeft(c.y);
    var stacked = !!c.layers;
    c.layers = (c.layers || 's').split('').map(function (type) {
      if (type === 's') {
        var g = c.sel.append('svg')
            .st({position: stacked ? 'absolute' : ''})
            .attr('width', c.totalWidth).attr('height', c.totalHeight)
          .append('g').attr('transform', 'translate(' + m.left + ',' + m.top + ')');
        if (!c.svg) c.svg = g;
        return g;
      }
      if (type === 'c') {
        var s = window.devicePixelRatio || 1;
        var ctx = c.sel.append('canvas')
          .at({width: c.totalWidth * s, height: c.totalHeight * s})
          .st({width: c.totalWidth, height: c.totalHeight, position: 'absolute'})
          .node().getContext('2d');
        ctx.scale(s, s);
        ctx.translate(m.left, m.top);
        return ctx;
      }
      if (type === 'd') {
        return c.sel.append('div')
          .st({position: 'absolute', left: m.left, top: m.top, width: c.width, height: c.height});
      }
      throw new Error('d3.conventions: unknown layer type ' + type);
    });
    c.drawAxis = function (svg) {
      svg = svg || c.svg;
      return {
        xAxisSel: svg.append('g').attr('class', 'x axis')
          .attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis),
        yAxisSel: svg.append('g').attr('class', 'y axis').call(c.yAxis),
      };
    };
    return c;
  };

  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return;
    tooltipSel = tooltipSel || d3.select('.tooltip');
    sel
      .on('mouseover.attachTooltip', function (ev, d) {
        var fns = fieldFns || Object.keys(d || {})
          .filter(function (k) { return typeof d[k] !== 'object'; })
          .map(function (k) { return function (e) { return k + ': <b>' + e[k] + '</b>'; }; });
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fns).html(function (fn) { return fn(d); });
        d3.select(this).classed('tooltipped', true);
      })
      .on('mousemove.attachTooltip', function (ev) {
        if (!tooltipSel.size()) return;
        var bb = tooltipSel.node().getBoundingClientRect();
        var left = d3.clamp(20, ev.clientX - bb.width / 2, window.innerWidth - bb.width - 20);
        var top = window.innerHeight > ev.clientY + 20 + bb.height
          ? ev.clientY + 20 : ev.clientY - bb.height - 20;
        tooltipSel.style('left', left + 'px').style('top', top + 'px');
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true);
        d3.selectAll('.tooltipped').classed('tooltipped', false);
      });
  };
})();
"""
