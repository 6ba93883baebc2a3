// A plugin's detail panel: header with status and actions, capabilities with their input schemas, telemetry
// charts, a live log view, and a settings form generated from the plugin's JSON Schema.
import { Widget } from '@lumino/widgets';

import { BkgError, el, formatBytes, formatUptime, ITelemetry, Live, request } from './api';
import { runAction } from './sidebar';

const LEVELS = ['DEBUG', 'INFO', 'WARNING', 'ERROR'];
const HISTORY = 150; // samples kept per chart (telemetry arrives every 2 s: the last 5 minutes)

type Series = { key: keyof ITelemetry; label: string; format: (v: number) => string };
const SERIES: Series[] = [
  { key: 'cpu_percent', label: 'cpu %', format: v => v.toFixed(1) },
  { key: 'rss_bytes', label: 'memory', format: v => formatBytes(v) },
  { key: 'latency_p50_ms', label: 'latency p50 (ms)', format: v => v.toFixed(1) },
  { key: 'requests_per_min', label: 'requests/min', format: v => String(v) }
];

function sparkline(values: number[]): SVGSVGElement {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 150 40');
  svg.setAttribute('class', 'bkg-spark');
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const pts = values.map((v, i) => `${(i * 150) / (HISTORY - 1)},${38 - (v / max) * 36}`).join(' ');
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', pts);
    svg.append(line);
  }
  return svg;
}

export class PluginPanel extends Widget {
  private header = el('div', { class: 'bkg-detail-header' });
  private charts = el('div', { class: 'bkg-charts' });
  private logList = el('div', { class: 'bkg-logs', tabindex: '0', 'aria-label': 'plugin log' });
  private logLevel = el('select', { 'aria-label': 'minimum log level' });
  private logSearch = el('input', { type: 'search', placeholder: 'search the log', 'aria-label': 'search the log' });
  private follow = true;
  private lines: any[] = [];
  private history: ITelemetry[] = [];
  private form = el('form', { class: 'bkg-settings', novalidate: '' });
  private schema: any = null;
  private config: Record<string, any> = {};
  private disposeListener: () => void;

  constructor(
    readonly pluginId: string,
    live: Live
  ) {
    super();
    this.id = `bkg-plugin-${pluginId}`;
    this.addClass('bkg-detail');
    this.title.label = `bkg: ${pluginId}`;
    this.title.closable = true;
    for (const l of LEVELS) {
      this.logLevel.append(el('option', { value: l }, l));
    }
    this.logLevel.addEventListener('change', () => this.renderLogs());
    this.logSearch.addEventListener('input', () => this.renderLogs());
    this.logList.addEventListener('scroll', () => {
      const atEnd = this.logList.scrollTop + this.logList.clientHeight >= this.logList.scrollHeight - 4;
      this.follow = atEnd; // scrolled up: stop following until the user comes back to the end
    });
    this.form.addEventListener('submit', ev => {
      ev.preventDefault();
      void this.save();
    });
    this.node.append(
      this.header,
      el('section', {}, el('h3', {}, 'Telemetry'), this.charts),
      el(
        'section',
        {},
        el('h3', {}, 'Log'),
        el('div', { class: 'bkg-log-tools' }, this.logLevel, this.logSearch),
        this.logList
      ),
      el('section', {}, el('h3', {}, 'Settings'), this.form),
      el('section', { class: 'bkg-caps' }, el('h3', {}, 'Capabilities'))
    );
    live.subscribe('logs', pluginId);
    this.disposeListener = live.listen(msg => this.onMessage(msg));
    void this.load();
  }

  dispose(): void {
    this.disposeListener();
    super.dispose();
  }

  private async load(): Promise<void> {
    const [info, logs, cfg] = await Promise.all([
      request(`api/plugins/${this.pluginId}`),
      request(`api/plugins/${this.pluginId}/logs?limit=500`),
      request(`api/plugins/${this.pluginId}/config`)
    ]);
    this.renderHeader(info);
    this.renderCaps(info.capabilities || []);
    this.lines = logs.lines || logs.logs || [];
    this.renderLogs();
    this.schema = cfg.schema;
    this.config = cfg.config;
    this.renderForm();
    const tel = await request(`api/plugins/${this.pluginId}/telemetry`);
    this.history.push((tel.telemetry || tel) as ITelemetry);
    this.renderCharts();
  }

  private onMessage(msg: any): void {
    if (msg.plugin !== this.pluginId) {
      return;
    }
    if (msg.type === 'logs') {
      this.lines.push(msg.payload);
      if (this.lines.length > 2000) {
        this.lines.splice(0, this.lines.length - 2000);
      }
      this.renderLogs();
    } else if (msg.type === 'telemetry') {
      this.history.push(msg.payload);
      if (this.history.length > HISTORY) {
        this.history.shift();
      }
      this.renderCharts();
    } else if (msg.type === 'status') {
      void request(`api/plugins/${this.pluginId}`).then(info => this.renderHeader(info));
    }
  }

  private renderHeader(info: any): void {
    const s = info.status;
    const actions = el('div', { class: 'bkg-actions' });
    for (const action of ['start', 'stop', 'restart'] as const) {
      const b = el('button', { class: `jp-Button bkg-action bkg-${action}` }, action[0].toUpperCase() + action.slice(1));
      const running = s.state === 'running' || s.state === 'degraded';
      (b as HTMLButtonElement).disabled = action === 'start' ? running : !running;
      b.addEventListener('click', () => void runAction(this.pluginId, action));
      actions.append(b);
    }
    this.header.replaceChildren(
      el('h2', {}, `${info.name} `, el('small', {}, `v${info.version} · ${info.mode}`)),
      el('span', { class: `bkg-badge bkg-state-${s.state}`, title: s.reason || s.state }, s.state),
      el('span', { class: 'bkg-uptime' }, ` up ${formatUptime(s.uptime_s)}`),
      el('p', {}, info.description || ''),
      ...(s.reason ? [el('p', { class: 'bkg-reason' }, s.reason)] : []),
      actions
    );
  }

  private renderCaps(caps: any[]): void {
    const section = this.node.querySelector('.bkg-caps') as HTMLElement;
    for (const c of caps) {
      section.append(
        el(
          'details',
          { class: 'bkg-cap' },
          el('summary', {}, el('code', {}, c.id), ` — ${c.summary} (${c.scope}${c.job ? ', background job' : ''})`),
          el('pre', {}, JSON.stringify(c.input_schema, null, 2))
        )
      );
    }
  }

  private renderCharts(): void {
    const last = this.history[this.history.length - 1];
    this.charts.replaceChildren(
      ...SERIES.map(s => {
        const values = this.history.map(t => Number(t[s.key] ?? 0));
        const now = last && last[s.key] !== null && last[s.key] !== undefined ? s.format(Number(last[s.key])) : '–';
        return el('figure', { class: 'bkg-chart' }, sparkline(values), el('figcaption', {}, `${s.label}: ${now}`));
      })
    );
  }

  private renderLogs(): void {
    const floor = LEVELS.indexOf(this.logLevel.value);
    const needle = this.logSearch.value.toLowerCase();
    const shown = this.lines.filter(
      l => LEVELS.indexOf(l.level) >= floor && (!needle || String(l.message).toLowerCase().includes(needle))
    );
    this.logList.replaceChildren(
      ...shown.slice(-500).map(l =>
        el(
          'div',
          { class: `bkg-log-line bkg-log-${String(l.level).toLowerCase()}` },
          el('time', {}, new Date(l.time * 1000).toLocaleTimeString()),
          el('b', {}, ` ${l.level} `),
          String(l.message)
        )
      )
    );
    if (this.follow) {
      this.logList.scrollTop = this.logList.scrollHeight;
    }
  }

  private renderForm(): void {
    const props: Record<string, any> = this.schema?.properties || {};
    const defs = this.schema?.$defs || {};
    this.form.replaceChildren();
    for (const [name, rawProp] of Object.entries(props)) {
      let prop: any = rawProp;
      if (prop.$ref) {
        prop = defs[prop.$ref.split('/').pop()] || prop;
      }
      const types: string[] = prop.anyOf ? prop.anyOf.map((a: any) => a.type) : [prop.type];
      const value = this.config[name] ?? prop.default ?? null;
      let input: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement;
      if (prop.enum) {
        input = el('select', {});
        for (const opt of prop.enum) {
          input.append(el('option', { value: String(opt) }, String(opt)));
        }
        input.value = String(value);
      } else if (types.includes('boolean')) {
        input = el('input', { type: 'checkbox' });
        (input as HTMLInputElement).checked = Boolean(value);
      } else if (types.includes('array') || types.includes('object')) {
        input = el('textarea', { rows: '2' });
        input.value = JSON.stringify(value);
      } else {
        const numeric = types.includes('integer') || types.includes('number');
        input = el('input', { type: numeric ? 'number' : 'text', step: types.includes('integer') ? '1' : 'any' });
        input.value = value === null ? '' : String(value);
      }
      input.name = name;
      input.id = `bkg-${this.pluginId}-${name}`;
      const error = el('div', { class: 'bkg-field-error', role: 'alert', 'data-field': name });
      this.form.append(
        el(
          'div',
          { class: 'bkg-field' },
          el('label', { for: input.id, title: prop.description || '' }, prop.title || name),
          input,
          el('small', {}, prop.description || ''),
          error
        )
      );
    }
    const save = el('button', { type: 'submit', class: 'jp-Button bkg-save' }, 'Save');
    const revert = el('button', { type: 'button', class: 'jp-Button bkg-revert' }, 'Revert');
    revert.addEventListener('click', () => this.renderForm());
    this.form.append(el('div', { class: 'bkg-form-actions' }, save, revert, el('span', { class: 'bkg-form-status' })));
  }

  private readForm(): Record<string, any> {
    const out: Record<string, any> = {};
    const props: Record<string, any> = this.schema?.properties || {};
    for (const [name, prop] of Object.entries(props)) {
      const input = this.form.elements.namedItem(name) as HTMLInputElement | null;
      if (!input) {
        continue;
      }
      const types: string[] = prop.anyOf ? prop.anyOf.map((a: any) => a.type) : [prop.type];
      if (input.type === 'checkbox') {
        out[name] = input.checked;
      } else if (input.tagName === 'TEXTAREA') {
        try {
          out[name] = JSON.parse(input.value);
        } catch {
          out[name] = input.value; // the gateway names the field in its 422
        }
      } else if (input.value === '' && types.includes('null')) {
        out[name] = null;
      } else if ((types.includes('integer') || types.includes('number')) && input.value !== '') {
        out[name] = Number(input.value);
      } else {
        out[name] = input.value;
      }
    }
    return out;
  }

  private async save(): Promise<void> {
    this.form.querySelectorAll('.bkg-field-error').forEach(e => (e.textContent = ''));
    this.form.querySelectorAll('.bkg-invalid').forEach(e => e.classList.remove('bkg-invalid'));
    const status = this.form.querySelector('.bkg-form-status') as HTMLElement;
    try {
      const r = await request(`api/plugins/${this.pluginId}/config`, {
        method: 'PUT',
        body: JSON.stringify({ config: this.readForm() })
      });
      this.config = r.config;
      status.textContent = r.restarted ? 'Saved; the plugin restarted to apply it.' : 'Saved.';
    } catch (e: any) {
      const field = e instanceof BkgError && e.field ? e.field.replace(/^config\./, '').split('.')[0] : null;
      const slot = field ? this.form.querySelector(`.bkg-field-error[data-field="${field}"]`) : null;
      if (slot) {
        slot.textContent = e.message;
        (this.form.elements.namedItem(field!) as HTMLElement)?.classList.add('bkg-invalid');
        status.textContent = 'Not saved: fix the field marked in red.';
      } else {
        status.textContent = `Not saved: ${e.message}`;
      }
    }
  }
}
