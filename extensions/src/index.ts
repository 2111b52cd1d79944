/**
 * MoE Workbench for JupyterLab: the trace-store sidebar, a launcher card and palette commands.
 * The data comes from the server extension (workbench/server/); this side only displays it and opens notebooks.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ILauncher } from '@jupyterlab/launcher';
import { LabIcon } from '@jupyterlab/ui-components';

import { addCommands, CommandIDs } from './commands';
import { TraceBrowser } from './sidebar';

const PALETTE_CATEGORY = 'MoE Workbench';

/** A 3x3 grid with two "hot" cells: a routing picture in miniature. */
const workbenchIcon = new LabIcon({
  name: 'moe-workbench:icon',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="2" y="2" width="6" height="6" rx="1"/><rect x="9" y="2" width="6" height="6" rx="1" opacity="0.4"/>
    <rect x="16" y="2" width="6" height="6" rx="1" opacity="0.4"/><rect x="2" y="9" width="6" height="6" rx="1" opacity="0.4"/>
    <rect x="9" y="9" width="6" height="6" rx="1" opacity="0.4"/><rect x="16" y="9" width="6" height="6" rx="1"/>
    <rect x="2" y="16" width="6" height="6" rx="1" opacity="0.4"/><rect x="9" y="16" width="6" height="6" rx="1"/>
    <rect x="16" y="16" width="6" height="6" rx="1" opacity="0.4"/>
  </g>
</svg>`
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'moe-workbench-lab:plugin',
  description: 'MoE Workbench: browse trace stores, open analysis and dashboard notebooks',
  autoStart: true,
  requires: [IDocumentManager],
  optional: [ICommandPalette, ILauncher, ILayoutRestorer, IDefaultFileBrowser],
  activate: (
    app: JupyterFrontEnd,
    docManager: IDocumentManager,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null,
    fileBrowser: IDefaultFileBrowser | null
  ) => {
    const sidebar = new TraceBrowser(app.commands);
    sidebar.title.icon = workbenchIcon;
    app.shell.add(sidebar, 'left', { rank: 900 });
    restorer?.add(sidebar, sidebar.id);

    addCommands({
      app,
      docManager,
      fileBrowser,
      icon: workbenchIcon,
      refresh: () => sidebar.refresh(),
      showSidebar: () => app.shell.activateById(sidebar.id)
    });
    for (const command of [CommandIDs.newLive, CommandIDs.refresh, CommandIDs.showSidebar]) {
      palette?.addItem({ command, category: PALETTE_CATEGORY });
    }
    // its own section: JupyterLab draws cards in the kernel sections ('Notebook', 'Console') with kernel logos
    launcher?.add({ command: CommandIDs.newLive, category: PALETTE_CATEGORY, rank: 1, args: { isLauncher: true } });

    void app.restored.then(() => sidebar.refresh());
  }
};

export default plugin;
