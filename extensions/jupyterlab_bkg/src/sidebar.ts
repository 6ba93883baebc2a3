// The left sidebar: every plugin as a row with a status badge, uptime, memory, requests/min and actions.
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { el, formatBytes, formatUptime, IPlugin, Live, request } from './api';

export type Action = 'start' | 'stop' | 'restart';

/** Ask first for stop and restart; then send the action. Returns false when the user cancelled. */
export async function runAction(id: string, action: Action): Promise<boolean> {
  if (action !== 'start') {
    const result = await showDialog({
      title: `${action === 'stop' ? 'Stop' : 'Restart'} ${id}?`,
      body: `Requests to ${id} fail while it is ${action === 'stop' ? 'stopped' : 'restarting'}.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: action === 'stop' ? 'Stop' : 'Restart' })]
    });
    if (!result.button.accept) {
      return false;
    }
  }
  try {
    await request(`api/plugins/${id}/${action}`, { method: 'POST' });
  } catch (e: any) {
    await showErrorMessage(`Could not ${action} ${id}`, e.message || String(e));
  }
  return true;
}

export class BkgSidebar extends Widget {
  private plugins = new Map<string, IPlugin>();
  private table: HTMLTableSectionElement;
  private banner: HTMLDivElement;

  constructor(
    live: Live,
    private openPlugin: (id: string) => void
  ) {
    super();
    this.id = 'bkg-sidebar';
    this.addClass('bkg-sidebar');
    this.title.caption = 'bkg plugins';
    this.banner = el('div', { class: 'bkg-banner', role: 'status' }, 'Connecting to the bkg gateway…');
    this.table = el('tbody');
    const head = el(
      'thead',
      {},
      el('tr', {}, ...['plugin', 'status', 'uptime', 'memory', 'req/min', ''].map(h => el('th', {}, h)))
    );
    this.node.append(
      el('div', { class: 'bkg-sidebar-header' }, el('h2', {}, 'bkg')),
      this.banner,
      el('table', { class: 'bkg-plugins', 'aria-label': 'bkg plugins' }, head, this.table)
    );
    live.listen(msg => this.onMessage(msg));
    live.onOpen(() => void this.refresh());
    void this.refresh();
  }

  async refresh(): Promise<void> {
    try {
      const data = await request<{ plugins: IPlugin[] }>('api/plugins');
      this.plugins = new Map(data.plugins.map(p => [p.id, p]));
      this.banner.textContent = '';
      this.banner.hidden = true;
      this.render();
    } catch (e: any) {
      this.banner.hidden = false;
      this.banner.textContent = e.message || String(e);
    }
  }

  private onMessage(msg: any): void {
    if (msg.type === 'disconnected') {
      this.banner.hidden = false;
      this.banner.textContent = 'Lost the bkg gateway; reconnecting…';
      return;
    }
    if (msg.type === 'bootstrap') {
      return; // the REST refresh on open gives the same, with names
    }
    const p = this.plugins.get(msg.plugin);
    if (!p) {
      if (msg.type === 'status') {
        void this.refresh();
      }
      return;
    }
    if (msg.type === 'status') {
      Object.assign(p, msg.payload);
      this.renderRow(p);
    } else if (msg.type === 'telemetry') {
      p.telemetry = { ...p.telemetry, ...msg.payload };
      if (msg.payload.uptime_s !== undefined) {
        p.uptime_s = msg.payload.uptime_s;
      }
      this.renderRow(p);
    }
  }

  private render(): void {
    this.table.replaceChildren();
    for (const p of this.plugins.values()) {
      this.renderRow(p);
    }
  }

  private renderRow(p: IPlugin): void {
    const running = p.state === 'running' || p.state === 'degraded';
    const button = (action: Action, label: string, enabled: boolean) => {
      const b = el('button', {
        class: `jp-Button bkg-action bkg-${action}`,
        title: `${label} ${p.id}`,
        'aria-label': `${label} ${p.id}`
      });
      b.textContent = label;
      (b as HTMLButtonElement).disabled = !enabled;
      b.addEventListener('click', ev => {
        ev.stopPropagation();
        void runAction(p.id, action);
      });
      return b;
    };
    const name = el('a', { href: '#', class: 'bkg-plugin-name', title: p.description }, p.name);
    name.addEventListener('click', ev => {
      ev.preventDefault();
      this.openPlugin(p.id);
    });
    const row = el(
      'tr',
      { 'data-plugin': p.id },
      el('td', {}, name),
      el('td', {}, el('span', { class: `bkg-badge bkg-state-${p.state}`, title: p.reason || p.state }, p.state)),
      el('td', { class: 'bkg-uptime' }, running ? formatUptime(p.uptime_s || p.telemetry?.uptime_s) : '–'),
      el('td', { class: 'bkg-memory' }, running ? formatBytes(p.telemetry?.rss_bytes) : '–'),
      el('td', { class: 'bkg-rpm' }, String(p.telemetry?.requests_per_min ?? 0)),
      el(
        'td',
        { class: 'bkg-actions' },
        button('start', 'Start', !running),
        button('stop', 'Stop', running),
        button('restart', 'Restart', running)
      )
    );
    const old = this.table.querySelector(`tr[data-plugin="${p.id}"]`);
    if (old) {
      old.replaceWith(row);
    } else {
      this.table.append(row);
    }
  }

  pluginIds(): string[] {
    return [...this.plugins.keys()];
  }
}
