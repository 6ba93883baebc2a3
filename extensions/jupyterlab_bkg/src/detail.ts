// A plugin's detail panel: header with status and actions, capabilities with their input schemas, telemetry
// charts, a live log view, and a settings form generated from the plugin's JSON Schema.
import { Widget } from '@lumino/widgets';

import { el, formatBytes, formatUptime, ITelemetry, Live, request } from './api';
import { mountSettingsForm } from './settingsform';
import { runAction } from './sidebar';

// The minimum levels offered; a line at a level not named here (a plugin's own) is shown whatever the minimum
const LEVELS = ['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'];
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
  private form = el('div', { class: 'bkg-settings-host' });
  private formRoot: { unmount(): void } | null = null;
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
    this.formRoot?.unmount();
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
    this.formRoot = mountSettingsForm(this.form, this.pluginId, cfg.schema, cfg.config);
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
      this.renderUptime(msg.payload.uptime_s);
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
      el('span', { class: 'bkg-uptime' }),
      el('p', {}, info.description || ''),
      ...(s.reason ? [el('p', { class: 'bkg-reason' }, s.reason)] : []),
      actions
    );
    this.renderUptime(s.uptime_s ?? 0);
  }

  /** The header's uptime: from the status at first, then from every telemetry message (every 2 s). */
  private renderUptime(seconds: number | undefined): void {
    const span = this.header.querySelector('.bkg-uptime');
    if (span && seconds !== undefined) {
      span.textContent = ` up ${formatUptime(seconds)}`;
    }
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
    const shown = this.lines.filter(l => {
      const rank = LEVELS.indexOf(String(l.level).toUpperCase());
      return (rank < 0 || rank >= floor) && (!needle || String(l.message).toLowerCase().includes(needle));
    });
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
}
